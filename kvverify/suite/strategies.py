"""Hypothesis strategies over model shapes, prompts and generation lengths.

Every public strategy takes keyword-only arguments, each a value, a collection to sample from, or a
strategy. Draws are small by default (hundreds of examples a minute) and shrink toward the smallest model:
one layer, one KV head, a short prompt, no window, few tokens.

>>> from kvverify.suite.strategies import cases
>>> cases(dtype="float64", sliding_window=4).example()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from kvverify.reference.config import DTYPES, NORMS, POSITIONALS, ModelConfig
from kvverify.suite.case import Case

T = TypeVar("T")

#: Block size of the built-in paged cache: lengths around its multiples are worth extra weight.
PAGED_BLOCK_SIZE = 4


def _strategy(value: T | Collection[T] | st.SearchStrategy[T], name: str) -> st.SearchStrategy[T]:
    """A strategy from a value, a non-empty collection to sample from, or a strategy."""
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        if not value:
            raise InvalidArgument(f"{name} must not be an empty collection")
        return st.sampled_from(sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value))
    return st.just(value)  # type: ignore[arg-type]


def _device(value: Any) -> str:
    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgument(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda:0'; got {value!r}"
        ) from None


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype; got {value!r}")
    return DTYPES[value]


@st.composite
def model_configs(
    draw: st.DrawFn,
    /,
    *,
    dtype: Any = ("float32", "float64"),
    numerics: Any = "strict",
    positional: Any = POSITIONALS,
    norm: Any = NORMS,
    sliding_window: Any = None,
    n_layers: Any = None,
    max_batch_size: int = 4,
    max_seq_len: Any = None,
    device: Any = "cpu",
) -> ModelConfig:
    """Valid :class:`ModelConfig` s: MHA, GQA and MQA, every positional scheme and norm, windows or none, on
    ``device`` (a torch.device or its name: the models, prompts and masks of the cases live there).

    ``sliding_window`` left at None draws no window half the time and a window of 1 to 12 otherwise; pass
    an int, a collection or a strategy to fix it, or ``st.none()`` for no window. ``max_seq_len`` left at
    None draws 16, 24 or 64 (short buffers are cheap to fill exactly); ``n_layers`` left at None draws 3 or
    more three times in four (bugs that need a third layer).
    Invariant: ``n_heads`` is a multiple of ``n_kv_heads``; ``head_dim`` is even (RoPE needs pairs).
    """
    where = _device(draw(_strategy(device, "device"), label="device"))
    seq_strategy = st.sampled_from([16, 24, 64]) if max_seq_len is None else _strategy(max_seq_len, "max_seq_len")
    seq_len = draw(seq_strategy, label="max_seq_len")
    if max_batch_size < 1 or seq_len < 2:
        raise InvalidArgument(f"max_batch_size >= 1 and max_seq_len >= 2 required; got {max_batch_size}, {seq_len}")
    n_kv_heads = draw(st.integers(1, 3), label="n_kv_heads")
    group = draw(st.sampled_from([1, 2, 4]), label="query heads per KV head")
    head_dim = draw(st.sampled_from([2, 4, 8]), label="head_dim")
    d_model = draw(st.sampled_from([8, 16, 24]), label="d_model")
    default_layers = st.sampled_from([1, 2, 3, 4]) | st.integers(3, 4)
    layers = draw(_strategy(n_layers, "n_layers") if n_layers is not None else default_layers, label="n_layers")
    window_strategy = (
        st.none() | st.integers(1, 12) if sliding_window is None else _strategy(sliding_window, "sliding_window")
    )
    return ModelConfig(
        vocab_size=draw(st.sampled_from([32, 61]), label="vocab_size"),
        d_model=d_model,
        n_layers=layers,
        n_heads=n_kv_heads * group,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=draw(st.sampled_from([16, 40]), label="d_ff"),
        norm=draw(_strategy(norm, "norm"), label="norm"),
        positional=draw(_strategy(positional, "positional"), label="positional"),
        sliding_window=draw(window_strategy, label="sliding_window"),
        max_seq_len=seq_len,
        max_batch_size=max_batch_size,
        dtype=_dtype(draw(_strategy(dtype, "dtype"), label="dtype")),
        numerics=draw(_strategy(numerics, "numerics"), label="numerics"),
        device=where,
    )


@st.composite
def prompts(
    draw: st.DrawFn,
    /,
    config: ModelConfig,
    *,
    batch_size: Any = None,
    length: Any = None,
    left_padding: bool = True,
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """A prompt for ``config``: (rows of token ids, left padding per row). Each row keeps at least one token."""
    batch = draw(
        _strategy(batch_size, "batch_size") if batch_size is not None else st.integers(1, config.max_batch_size),
        label="batch",
    )
    if not 1 <= batch <= config.max_batch_size:
        raise InvalidArgument(f"batch_size must lie in [1, {config.max_batch_size}]; got {batch}")
    default_length = st.integers(1, min(12, config.max_seq_len))
    size = draw(_strategy(length, "length") if length is not None else default_length, label="prompt length")
    tokens = st.integers(0, config.vocab_size - 1)
    rows = tuple(tuple(draw(st.lists(tokens, min_size=size, max_size=size))) for _ in range(batch))
    pads = tuple(draw(st.integers(0, size - 1)) if left_padding else 0 for _ in range(batch))
    return rows, pads


def boundary_lengths(config: ModelConfig) -> list[int]:
    """Total lengths at which caches break most: either side of the window, its multiples, the paged block
    size, powers of two and a full buffer (``max_seq_len``, when it is at most 32: longer ones are slow to fill
    without a cache)."""
    marks = {PAGED_BLOCK_SIZE, 2 * PAGED_BLOCK_SIZE, 8, 16, 32}
    if config.max_seq_len <= 32:
        marks.add(config.max_seq_len)
    if config.sliding_window is not None:
        w = config.sliding_window
        marks |= {w, 2 * w, 3 * w}
    return sorted({m + d for m in marks for d in (-1, 0, 1) if 1 <= m + d <= config.max_seq_len})


@st.composite
def generation_lengths(draw: st.DrawFn, /, config: ModelConfig, prompt_len: int) -> int:
    """``max_new_tokens`` for a prompt: often one that ends (or passes) a boundary of :func:`boundary_lengths`,
    and, for buffers of at most 32 tokens, one in five that fills the buffer exactly."""
    room = config.max_seq_len - prompt_len + 1
    plain = st.integers(1, min(room, 24))
    targets = [n - prompt_len + 1 for n in boundary_lengths(config)]
    aimed = [n for n in targets if 1 <= n <= room]
    if not aimed:
        return draw(plain, label="max_new_tokens")
    choices = [plain, st.sampled_from(aimed), plain, st.sampled_from(aimed)]
    if config.max_seq_len <= 32:
        choices.append(st.just(room))  # the cache ends holding exactly max_seq_len tokens
    return draw(st.one_of(choices), label="max_new_tokens")


@st.composite
def cases(
    draw: st.DrawFn,
    /,
    *,
    config: ModelConfig | st.SearchStrategy[ModelConfig] | None = None,
    batch_size: Any = None,
    left_padding: bool = True,
    prompt_length: Any = None,
    **config_kwargs: Any,
) -> Case:
    """A :class:`Case`: a config (from :func:`model_configs` with ``config_kwargs`` unless given), a weights
    seed, a prompt (of ``prompt_length`` tokens when given, at most ``max_seq_len``) and a generation length."""
    if config is None:
        config = model_configs(**config_kwargs)
    elif config_kwargs:
        raise InvalidArgument(f"pass either config or model_configs arguments, not both: {sorted(config_kwargs)}")
    cfg = draw(_strategy(config, "config"), label="config")
    length = None
    if prompt_length is not None:
        length = min(draw(_strategy(prompt_length, "prompt_length"), label="prompt length"), cfg.max_seq_len)
    rows, pads = draw(prompts(cfg, batch_size=batch_size, length=length, left_padding=left_padding), label="prompt")
    new = draw(generation_lengths(cfg, len(rows[0])))
    seed = draw(st.integers(0, 3), label="weights seed")
    return Case(config=cfg, prompt=rows, pad=pads, max_new_tokens=new, seed=seed)
