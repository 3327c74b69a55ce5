"""The long-context check: one strict generation thousands of tokens long through the cache, compared bit for bit
with the uncached logits of every step from one teacher-forced forward (:mod:`kvverify.checks.expected`).

The regular properties draw sequences of at most a few dozen tokens; bugs that show only past a length
(a buffer that wraps or stops growing at 2048 tokens, positions held in a narrow integer) need one long run.
The ``long_context`` property runs one such case (its strategy has a single value, so Hypothesis runs it once);
it is opt-in for ``kvverify verify --property long_context`` and part of ``kvverify mutants``.
``kvverify long-context`` runs it at any length with timing.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from kvverify.checks.case import Case
from kvverify.checks.properties.generation import check_cached_equals_uncached
from kvverify.checks.property import Property
from kvverify.checks.target import Target
from kvverify.protocol.config import ModelConfig

#: Tokens the property's case ends holding: past 2048, where the planted long-context bugs show.
LENGTH = 2176
PROMPT = 16


def long_config(length: int, *, sliding_window: int | None = None, dtype: str = "float32",
                device: str | torch.device = "cpu") -> ModelConfig:
    """2 layers, 2 heads of head_dim 64, d_model 128, strict numerics, room for exactly ``length`` tokens."""
    return ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=2, head_dim=64, max_seq_len=length,
                       max_batch_size=1, sliding_window=sliding_window, dtype=dtype,  # type: ignore[arg-type]
                       device=str(device))


def long_case(length: int = LENGTH, *, prompt: int = PROMPT, seed: int = 0, sliding_window: int | None = None,
              dtype: str = "float32", device: str | torch.device = "cpu") -> Case:
    """One row: a ``prompt``-token prompt and the rest generated, so that the cache ends holding ``length``."""
    if not 1 <= prompt < length:
        raise ValueError(f"a long-context case needs 1 <= prompt < length; got prompt={prompt}, length={length}")
    config = long_config(length, sliding_window=sliding_window, dtype=dtype, device=device)
    tokens = torch.randint(0, config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(seed))
    return Case(config, (tuple(tokens.tolist()),), (0,), length - prompt + 1, seed)


def long_context_cases(target: Target) -> st.SearchStrategy[Case]:
    declared = target.declaration
    length = min(LENGTH, declared.max_seq_len) if declared.max_seq_len else LENGTH
    return st.just(long_case(length, sliding_window=declared.sliding_window, device=target.device))


LONG_CONTEXT = Property(
    name="long_context",
    summary=(
        f"One strict generation of {LENGTH} tokens (a {PROMPT}-token prompt, the rest decoded) through the cache "
        "equals the uncached logits of every step, bit for bit: buffers that wrap or stop growing past 2048 "
        "tokens, positions held in a narrow integer, anything that shows only in long contexts."
    ),
    needs=frozenset(),
    strategy=long_context_cases,
    check=check_cached_equals_uncached,
)
