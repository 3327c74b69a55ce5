"""Hypothesis strategies over model shapes, prompts and generation lengths.

Every public strategy takes keyword-only arguments, each a value, a collection to sample from, or a
strategy. Draws are small by default (hundreds of examples a minute) and shrink toward the smallest model:
one layer, one KV head, a short prompt, no window, few tokens. ``shapes="production"`` draws the shapes of
served models instead (:mod:`kvverify.checks.shapes`); a cache's declaration narrows either
(:meth:`kvverify.checks.target.Target.config_constraints`).

>>> from kvverify.checks.strategies import cases
>>> cases(dtype="float64", sliding_window=4).example()  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any, TypeVar

import torch
from hypothesis import reject
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from kvverify.checks.case import Case
from kvverify.checks.shapes import DEFAULT, ShapeSpace, shape_space
from kvverify.protocol.config import DTYPES, NORMS, POSITIONALS, ModelConfig, device_name

T = TypeVar("T")

#: Block size of the built-in paged cache: lengths around its multiples are worth extra weight.
PAGED_BLOCK_SIZE = DEFAULT.block_size


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
    name = device_name(value)
    if name is None:
        raise InvalidArgument(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0'; got {value!r}")
    return name


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype; got {value!r}")
    return DTYPES[value]


def _narrowed(value: Any, allowed: Collection[Any] | None, convert: Any = None) -> Any:
    """``value`` (a value, collection or strategy) cut to ``allowed``: a collection is intersected (the allowed
    values themselves when nothing is left); a value or strategy is drawn as is and rejected when outside."""
    if allowed is None:
        return value
    same = convert or (lambda v: v)
    if isinstance(value, (list, tuple, set, frozenset)):
        kept = [v for v in value if same(v) in allowed]
        return kept or list(allowed)
    if isinstance(value, st.SearchStrategy):
        return value.filter(lambda v: same(v) in allowed)
    return value if same(value) in allowed else list(allowed)


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
    shapes: str | ShapeSpace = "default",
    head_dims: Collection[int] | None = None,
    dtypes: Collection[Any] | None = None,
    longest: int | None = None,
) -> ModelConfig:
    """Valid :class:`ModelConfig` s: MHA, GQA and MQA, every positional scheme and norm, windows or none, on
    ``device`` (a torch.device or its name: the models, prompts and masks of the cases live there).

    ``sliding_window`` left at None draws no window half the time and a window of 1 to 12 otherwise; pass
    an int, a collection or a strategy to fix it, or ``st.none()`` for no window. ``max_seq_len`` left at
    None draws from the shape space (default: 16, 24, 64 or 128), at most ``longest`` when given;
    ``n_layers`` left at None draws 3 or more three times in four (bugs that need a third layer).
    ``shapes``: ``"default"`` or ``"production"`` (:mod:`kvverify.checks.shapes`). ``head_dims`` and
    ``dtypes``: the only ones drawn (a cache's declaration), whatever ``dtype`` asks for.
    Invariant: ``n_heads`` is a multiple of ``n_kv_heads``; ``head_dim`` is even under RoPE (pairs).
    """
    where = _device(draw(_strategy(device, "device"), label="device"))
    space = shapes if isinstance(shapes, ShapeSpace) else shape_space(shapes, where)
    seq_choices = [min(s, longest or s) for s in space.max_seq_lens]  # repeats kept: they are weights
    seq_strategy = st.sampled_from(seq_choices) if max_seq_len is None else _strategy(max_seq_len, "max_seq_len")
    seq_len = draw(seq_strategy, label="max_seq_len")
    if max_batch_size < 1 or seq_len < 2:
        raise InvalidArgument(f"max_batch_size >= 1 and max_seq_len >= 2 required; got {max_batch_size}, {seq_len}")
    n_kv_heads = draw(st.sampled_from(space.kv_heads), label="n_kv_heads")
    group = draw(st.sampled_from(space.groups), label="query heads per KV head")
    head_dim = draw(st.sampled_from(tuple(head_dims or space.head_dims)), label="head_dim")
    d_model = draw(st.sampled_from(space.d_models), label="d_model")
    default_layers = st.sampled_from(space.n_layers)
    layers = draw(_strategy(n_layers, "n_layers") if n_layers is not None else default_layers, label="n_layers")
    window_strategy = (
        st.none() | st.integers(1, 12) if sliding_window is None else _strategy(sliding_window, "sliding_window")
    )
    allowed = {_dtype(d) for d in (dtypes or space.dtypes or ())} or None
    chosen = _dtype(draw(_strategy(_narrowed(dtype, allowed, _dtype), "dtype"), label="dtype"))
    scheme = draw(_strategy(positional, "positional"), label="positional")
    if scheme == "rope" and head_dim % 2:
        reject()  # RoPE rotates pairs of lanes
    drawn_numerics = draw(_strategy(numerics, "numerics"), label="numerics")
    return ModelConfig(
        vocab_size=draw(st.sampled_from(space.vocab_sizes), label="vocab_size"),
        d_model=d_model,
        n_layers=layers,
        n_heads=n_kv_heads * group,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=draw(st.sampled_from(space.d_ffs), label="d_ff"),
        norm=draw(_strategy(norm, "norm"), label="norm"),
        positional=scheme,
        sliding_window=draw(window_strategy, label="sliding_window"),
        max_seq_len=seq_len,
        max_batch_size=max_batch_size,
        dtype=chosen,
        numerics=drawn_numerics if space.strict else "fast",
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
    batch_sizes: Collection[int] | None = None,
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """A prompt for ``config``: (rows of token ids, left padding per row). Each row keeps at least one token.
    ``batch_sizes``: the only batch sizes allowed (a cache's declaration); others are rejected."""
    default_batch = st.integers(1, config.max_batch_size)
    if batch_sizes is not None:
        default_batch = st.sampled_from(sorted(b for b in batch_sizes if b <= config.max_batch_size) or [0])
    batch = draw(_strategy(batch_size, "batch_size") if batch_size is not None else default_batch, label="batch")
    if batch_sizes is not None and batch not in batch_sizes:
        reject()  # a size the cache does not take
    if not 1 <= batch <= config.max_batch_size:
        raise InvalidArgument(f"batch_size must lie in [1, {config.max_batch_size}]; got {batch}")
    size = draw(_strategy(length, "length") if length is not None else prompt_lengths(config), label="prompt length")
    rows = token_rows(draw, config.vocab_size, batch, size, "prompt tokens")
    pads = tuple(draw(st.integers(0, size - 1)) if left_padding else 0 for _ in range(batch))
    return rows, pads


#: Rows longer than this are drawn as a seed, not token by token (Hypothesis bounds the choices of one example).
SEEDED_ROWS = 32


def token_rows(draw: Any, vocab_size: int, rows: int, count: int, label: str) -> tuple[tuple[int, ...], ...]:
    """``rows`` rows of ``count`` token ids below ``vocab_size``: drawn one by one (so that they shrink) up to
    :data:`SEEDED_ROWS` tokens, from one drawn seed beyond (a 500-token append would use up an example's
    choices)."""
    if count <= SEEDED_ROWS:
        ids = st.integers(0, vocab_size - 1)
        return tuple(tuple(draw(st.lists(ids, min_size=count, max_size=count), label=label)) for _ in range(rows))
    generator = random.Random(draw(st.integers(0, 2**32 - 1), label=f"{label}: seed"))
    return tuple(tuple(generator.randrange(vocab_size) for _ in range(count)) for _ in range(rows))


def _space_of(config: ModelConfig, shapes: str | ShapeSpace | None = None) -> ShapeSpace:
    """The shape space named (or given); when None, the one ``config`` was most likely drawn from (production
    shapes have head_dim 64 or more)."""
    if isinstance(shapes, ShapeSpace):
        return shapes
    if shapes is None:
        shapes = "production" if config.head_dim >= 64 else "default"
    return shape_space(shapes, config.device)


def prompt_lengths(
    config: ModelConfig, *, block_size: int | None = None, shapes: str | ShapeSpace | None = None
) -> st.SearchStrategy[int]:
    """Prompt lengths for ``config``: short ones most often, some aimed at a boundary of :func:`boundary_lengths`
    (a prefill is a multi-token append across it), some long (up to the space's ``long_prompt``)."""
    space = _space_of(config, shapes)
    short = st.integers(1, min(space.short_prompt, config.max_seq_len))
    longest = min(space.long_prompt, config.max_seq_len - 2)  # room for a token or two after the prompt
    if longest <= space.short_prompt:
        return short
    # boundaries past the long prompts too (128, 256, 512: engines' allocation chunks), where the buffer has room
    aimed = [n for n in boundary_lengths(config, block_size=block_size, shapes=space) if n <= config.max_seq_len - 2]
    middle = (space.short_prompt + 1 + longest) // 2  # two halves: integers() alone favours the low end
    lower, upper = st.integers(space.short_prompt + 1, middle), st.integers(middle, longest)
    choices = [short, *([st.sampled_from(aimed)] if aimed else [short]), lower, upper]
    pages = block_lengths(block_size, longest)
    return st.one_of(*choices, *([st.sampled_from(pages)] * 2 if pages else []))


def block_lengths(block_size: int | None, longest: int) -> list[int]:
    """Lengths either side of every multiple of a declared ``block_size`` up to ``longest`` (none when None):
    a declared page size gets weight of its own, beyond the boundaries every case aims at."""
    if block_size is None:
        return []
    return [n for k in range(1, longest // block_size + 2) for n in (k * block_size + d for d in (-1, 0, 1))
            if 1 <= n <= longest]


def boundary_lengths(
    config: ModelConfig, *, block_size: int | None = None, shapes: str | ShapeSpace | None = None
) -> list[int]:
    """Total lengths at which caches break most: either side of the window, its multiples, the block size
    (``block_size``, else the space's: 4 by default, 16 in production) and its multiples up to four blocks,
    powers of two from 8 (64, 128, ... are page sizes too) and a full buffer (``max_seq_len``, when it is at most
    32: longer ones are slow to fill without a cache)."""
    block = block_size or _space_of(config, shapes).block_size
    marks = {block * k for k in (1, 2, 3, 4)} | {2**k for k in range(3, 13)}
    if config.max_seq_len <= 32:
        marks.add(config.max_seq_len)
    if config.sliding_window is not None:
        w = config.sliding_window
        marks |= {w, 2 * w, 3 * w}
    return sorted({m + d for m in marks for d in (-1, 0, 1) if 1 <= m + d <= config.max_seq_len})


@st.composite
def generation_lengths(
    draw: st.DrawFn, /, config: ModelConfig, prompt_len: int, *, block_size: int | None = None,
    shapes: str | ShapeSpace | None = None,
) -> int:
    """``max_new_tokens`` for a prompt: often one that ends (or passes) a boundary of :func:`boundary_lengths`
    within the space's ``max_new`` tokens (a quarter of that after a long prompt: the uncached oracle's cost
    grows with both), and, for buffers of at most 32 tokens, one in five that fills the
    buffer exactly."""
    space = _space_of(config, shapes)
    room = config.max_seq_len - prompt_len + 1
    most = space.max_new if prompt_len <= space.short_prompt else max(8, space.max_new // 4)  # cost ~ new * length
    plain = st.integers(1, min(room, 24, most))
    targets = [n - prompt_len + 1 for n in boundary_lengths(config, block_size=block_size, shapes=space)]
    aimed = [n for n in targets if 1 <= n <= min(room, most)]
    if not aimed:
        return draw(plain, label="max_new_tokens")
    choices = [plain, st.sampled_from(aimed), plain, st.sampled_from(aimed)]
    pages = [n - prompt_len + 1 for n in block_lengths(block_size, config.max_seq_len)]
    choices += [st.sampled_from(kept)] * 2 if (kept := [n for n in pages if 1 <= n <= min(room, most)]) else []
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
    block_size: int | None = None,
    batch_sizes: Collection[int] | None = None,
    **config_kwargs: Any,
) -> Case:
    """A :class:`Case`: a config (from :func:`model_configs` with ``config_kwargs`` unless given), a weights
    seed, a prompt (of ``prompt_length`` tokens when given, at most ``max_seq_len``) and a generation length.

    ``block_size``: lengths weighted to its multiples (a paged cache's page size). ``batch_sizes``: the only
    batch sizes drawn, and the config's ``max_batch_size`` is the case's batch (a cache declaring exact batch
    sizes builds for it)."""
    if config is None:
        config = model_configs(**config_kwargs)
    elif config_kwargs:
        raise InvalidArgument(f"pass either config or model_configs arguments, not both: {sorted(config_kwargs)}")
    cfg = draw(_strategy(config, "config"), label="config")
    space = _space_of(cfg, config_kwargs.get("shapes"))
    length = prompt_lengths(cfg, block_size=block_size, shapes=space)
    if prompt_length is not None:
        length = st.just(min(draw(_strategy(prompt_length, "prompt_length"), label="prompt length"), cfg.max_seq_len))
    rows, pads = draw(prompts(cfg, batch_size=batch_size, length=length, left_padding=left_padding,
                              batch_sizes=batch_sizes), label="prompt")
    if batch_sizes is not None:
        cfg = cfg.replace(max_batch_size=len(rows))
    new = draw(generation_lengths(cfg, len(rows[0]), block_size=block_size, shapes=space))
    seed = draw(st.integers(0, 3), label="weights seed")
    return Case(config=cfg, prompt=rows, pad=pads, max_new_tokens=new, seed=seed)
