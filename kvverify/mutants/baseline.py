"""The conventional way to test a KV cache, as transformers' generation tests do it, for comparison.

A fixed parametrized grid on one tiny model (the shape of transformers' model testers: batch 13, 7 prompt
tokens, 2 layers, 2 heads) with the standard kernels (``numerics="fast"``): generate 4 new tokens with the
cache and compare with ``use_cache=False`` (same tokens, logits within ``atol=rtol=1e-5``), and continue a
generation from its returned cache and compare with generating from scratch, each with and without left
padding. :func:`run_baseline` runs the grid against a cache factory and stops at the first failing case.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kvverify.checks.compare import Tolerance, first_difference
from kvverify.engine.generation import generate
from kvverify.protocol.cache import KVCache
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import Generation, ReferenceModel

Check = Literal["use_cache", "continuation"]

#: The model of the grid: transformers' tester sizes (vocab 99, hidden 32, intermediate 37, 512 positions).
BASELINE_CONFIG = ModelConfig(
    vocab_size=99, d_model=32, n_layers=2, n_heads=2, d_ff=37, max_seq_len=512, max_batch_size=13, numerics="fast"
)
BATCH, PROMPT_LEN, NEW_TOKENS = 13, 7, 4
ATOL = RTOL = 1e-5
#: transformers' tests' rule: the same sequences (no near-tie allowance) and ``torch.allclose`` logits.
TOLERANCE = Tolerance(atol=ATOL, rtol=RTOL, near_ties=False, why="transformers' generation tests")


@dataclass(frozen=True)
class BaselineCase:
    """One point of the grid: what is compared, and whether the prompt is left-padded."""

    check: Check
    padded: bool

    @property
    def name(self) -> str:
        return f"{self.check}[{'left_padding' if self.padded else 'no_padding'}]"


#: The grid, in the order it runs.
BASELINE_CASES: tuple[BaselineCase, ...] = tuple(
    BaselineCase(check, padded) for check in ("use_cache", "continuation") for padded in (False, True)
)


@dataclass(frozen=True)
class BaselineResult:
    """killed: some case failed; failing_case: its name and what differed (None when all passed);
    cpu_seconds: process CPU time the grid took; cases_run: cases run before stopping."""

    killed: bool
    failing_case: str | None
    cpu_seconds: float
    cases_run: int


def _inputs(padded: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (13, 7) and an attention mask on ``device``; with padding, row i has ``i % 4`` pad tokens on the
    left."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, BASELINE_CONFIG.vocab_size, (BATCH, PROMPT_LEN), generator=generator)
    mask = torch.ones_like(input_ids)
    if padded:
        for row in range(BATCH):
            mask[row, : row % 4] = 0
    return input_ids.to(device), mask.to(device)


def _compare(got: Generation, want: Generation, what: str) -> str | None:
    """None when the generations agree as transformers' tests require, else what differed."""
    mismatch = first_difference(want, got, TOLERANCE)
    return None if mismatch is None else f"{what}: {mismatch}"


def _run_case(model: ReferenceModel, factory: Callable[[ModelConfig], KVCache], case: BaselineCase) -> str | None:
    config = model.config
    input_ids, mask = _inputs(case.padded, torch.device(config.device))
    want = model.generate(input_ids, NEW_TOKENS, use_cache=False, attention_mask=mask)
    if case.check == "use_cache":
        got = generate(model, input_ids, NEW_TOKENS, cache=factory(config), attention_mask=mask)
        return _compare(got, want, "use_cache=True vs use_cache=False")
    half = NEW_TOKENS // 2
    first = generate(model, input_ids, half, cache=factory(config), attention_mask=mask)
    rest = generate(model,
        first.sequences, NEW_TOKENS - half, cache=first.cache, attention_mask=first.attention_mask
    )
    continued = Generation(
        tokens=torch.cat((first.tokens, rest.tokens), dim=1),
        logits=torch.cat((first.logits, rest.logits), dim=1),
        sequences=rest.sequences,
        attention_mask=rest.attention_mask,
        cache=rest.cache,
    )
    return _compare(continued, want, f"{half} + {NEW_TOKENS - half} tokens from the returned cache vs from scratch")


def run_baseline(factory: Callable[[ModelConfig], KVCache], *, seed: int = 0,
                 device: str | torch.device = "cpu") -> BaselineResult:
    """Run the conventional grid against a cache factory, on ``device``; stop at the first failing case.

    >>> from kvverify.caches import ContiguousCache
    >>> run_baseline(ContiguousCache.from_config).killed
    False
    """
    start = time.process_time()
    model = ReferenceModel(BASELINE_CONFIG.replace(device=str(device)), seed=seed)
    for run, case in enumerate(BASELINE_CASES, start=1):
        try:
            failure = _run_case(model, factory, case)
        except Exception as error:  # a crash fails the case, as it would fail the test
            failure = f"raised {type(error).__name__}: {error}"
        if failure is not None:
            return BaselineResult(True, f"{case.name}: {failure}", time.process_time() - start, run)
    return BaselineResult(False, None, time.process_time() - start, len(BASELINE_CASES))
