"""The shapes the strategies draw from: ``default`` (toy models, fast enough for CI) and ``production``
(the head dimensions, GQA ratios, dtypes, page sizes and context lengths of served models).

A :class:`ShapeSpace` lists the candidates for each dimension; a cache's declaration narrows them further
(:meth:`kvverify.checks.target.Target.config_constraints`). Choose one with ``kvverify verify --shapes``,
``pytest --kv-shapes`` or ``check_cache(shapes=)``.

>>> shape_space("production", "cpu").head_dims
(64, 128)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvverify.checks.watchdog import DEFAULT_TIME_LIMIT

#: The names :func:`shape_space` accepts.
SHAPES: tuple[str, ...] = ("default", "production")


class ShapesError(ValueError):
    """An unknown shape space was asked for; the message names the ones there are."""


@dataclass(frozen=True)
class ShapeSpace:
    """Candidates per dimension. Lengths: most prompts hold at most ``short_prompt`` tokens, some up to
    ``long_prompt`` (capped by ``max_seq_len``), many aim at a boundary (a block multiple, a window, a power of
    two, either side of it); generations add at most ``max_new`` tokens (the uncached oracle recomputes the
    whole prefix per token, so long contexts come from long prompts, not long generations).

    strict: whether strict numerics (bitwise, and slow at large widths on the CPU) is drawn; when False every
    case runs fast numerics, compared within the dtype's tolerance. dtypes: None keeps what each property asks
    for; else the only dtypes drawn. time_limit: the seconds one example may take unless the user says otherwise
    (a hang is reported past it)."""

    name: str
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    groups: tuple[int, ...]
    d_models: tuple[int, ...]
    d_ffs: tuple[int, ...]
    vocab_sizes: tuple[int, ...]
    n_layers: tuple[int, ...]
    max_seq_lens: tuple[int, ...]
    block_size: int
    short_prompt: int
    long_prompt: int
    max_new: int
    strict: bool = True
    dtypes: tuple[str, ...] | None = None
    time_limit: float = DEFAULT_TIME_LIMIT


DEFAULT = ShapeSpace(
    name="default", head_dims=(2, 4, 8), kv_heads=(1, 2, 3), groups=(1, 2, 4), d_models=(8, 16, 24),
    d_ffs=(16, 40), vocab_sizes=(32, 61), n_layers=(1, 2, 3, 4, 3, 4),
    max_seq_lens=(16, 24, 64, 128, 128, 128, 160, 288, 544),  # the last three past engines' 128/256/512 chunks
    block_size=4, short_prompt=12, long_prompt=96, max_new=32,
)

#: Seconds one production-shape example may take by default: padded batches of thousands of tokens passed 60 s
#: on a 2-core machine at load 8 (``verify contiguous --shapes production --profile dev --seed 1``: three
#: properties in strict numerics, five in fast), a hang reported where there was none.
PRODUCTION_TIME_LIMIT = 300.0

#: Strict numerics on the CPU too (the native fixed-order kernels make a forward at these widths cost about
#: twice the standard kernels' time); on CUDA, wider models.
_PRODUCTION_CPU = ShapeSpace(
    name="production", head_dims=(64, 128), kv_heads=(1, 2), groups=(1, 2, 4, 8), d_models=(256, 512, 1024),
    d_ffs=(512, 1024), vocab_sizes=(256, 1024), n_layers=(1, 2), max_seq_lens=(256, 1024, 4096),
    block_size=16, short_prompt=64, long_prompt=4096, max_new=16, dtypes=("bfloat16", "float16"),
    time_limit=PRODUCTION_TIME_LIMIT,
)
_PRODUCTION_CUDA = ShapeSpace(
    name="production", head_dims=(64, 128), kv_heads=(1, 2, 4, 8), groups=(1, 2, 4, 8),
    d_models=(1024, 2048, 4096), d_ffs=(2048, 4096), vocab_sizes=(1024, 32000), n_layers=(1, 2, 4),
    max_seq_lens=(256, 1024, 4096), block_size=16, short_prompt=64, long_prompt=4096, max_new=32,
    dtypes=("bfloat16", "float16"), time_limit=PRODUCTION_TIME_LIMIT,
)


def shape_space(name: str, device: str | torch.device = "cpu") -> ShapeSpace:
    """The space called ``name`` for models on ``device``; raises :class:`ShapesError` for an unknown name."""
    if name == "default":
        return DEFAULT
    if name == "production":
        return _PRODUCTION_CUDA if torch.device(device).type == "cuda" else _PRODUCTION_CPU
    raise ShapesError(f"unknown shapes {name!r}; expected one of {', '.join(SHAPES)} (default: toy models for "
                      "CI; production: head_dim 64/128, GQA up to 8, bf16/fp16, blocks of 16, contexts to 4096).")


def default_time_limit(shapes: str) -> float:
    """Seconds one example may take at these shapes unless the user sets a limit (or ``none``)."""
    return shape_space(shapes).time_limit
