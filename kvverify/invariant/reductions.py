"""Sums, means, softmax and log-softmax from :mod:`~kvverify.invariant.ordered`'s left-to-right sum.

Each accumulates in float32 at least (as torch's own reductions do for half types) and returns the dtype torch's
kernel would. Exponentials and logarithms are lane-stable on the CPU (:func:`~kvverify.reference.numerics.lane_stable`).
Masked keys reach a softmax as -inf (or a very negative finite score) and leave it as exact zeros, which the
left-to-right sums ignore wherever they sit; the row maximum is order-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvverify.invariant.ordered import ordered_sum, total_sum
from kvverify.reference.numerics import compute_dtype, lane_stable


def _dims(x: torch.Tensor, dim: int | Sequence[int] | None) -> list[int]:
    """The reduced dimensions, normalised and sorted; every one for None or []."""
    if dim is None:
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return list(range(x.dim()))
    return sorted({d % max(x.dim(), 1) for d in dims})


def reduce_sum(
    x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.sum(x, dim, keepdim, dtype=dtype)`` for a floating-point result: left to right over the reduced
    dimensions (flattened in row-major order), or the oracle's tree when every dimension is reduced."""
    returned = dtype or x.dtype
    h = x.to(compute_dtype(returned))
    dims = _dims(x, dim)
    if len(dims) == x.dim():
        out = total_sum(h)
        if keepdim:
            out = out.reshape((1,) * x.dim())
    else:
        kept = [d for d in range(x.dim()) if d not in dims]
        flat = h.permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)  # (..., reduced)
        out = ordered_sum(flat, -1)
        if keepdim:
            out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return out.to(returned)


def reduce_mean(
    x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.mean``: :func:`reduce_sum` in the accumulation type, divided by the count of reduced elements."""
    returned = dtype or x.dtype
    count = 1
    for d in _dims(x, dim):
        count *= x.shape[d] if x.dim() else 1
    total = reduce_sum(x, dim, keepdim, compute_dtype(returned))
    return (total / count).to(returned)


def _weights(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shifted scores, exp(shifted), their sum keeping ``dim``), in the accumulation type."""
    h = x.to(compute_dtype(x.dtype))
    shifted = h - h.amax(dim, keepdim=True)
    weights = lane_stable(torch.exp, shifted)
    return shifted, weights, ordered_sum(weights, dim).unsqueeze(dim)


def softmax(x: torch.Tensor, dim: int, half_to_float: bool = False, safe: bool = False) -> torch.Tensor:
    """``aten._softmax`` (``safe``: ``aten._safe_softmax``, whose rows of only -inf give zeros, not NaN)."""
    _, weights, total = _weights(x, dim)
    out = weights / total
    if safe:
        out = out.masked_fill((x == float("-inf")).all(dim, keepdim=True), 0.0)
    return out.to(torch.float32 if half_to_float else x.dtype)


def log_softmax(x: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    """``aten._log_softmax``: the shifted scores minus the log of their exponentials' sum."""
    shifted, _, total = _weights(x, dim)
    out = shifted - lane_stable(torch.log, total)
    return out.to(torch.float32 if half_to_float else x.dtype)


def logsumexp(x: torch.Tensor, dim: int | Sequence[int], keepdim: bool = False) -> torch.Tensor:
    """``torch.logsumexp`` over one or more dimensions (flattened); infinite maxima are taken out as 0."""
    dims = _dims(x, dim)
    kept = [d for d in range(x.dim()) if d not in dims]
    h = x.to(compute_dtype(x.dtype))
    flat = h.permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)  # (..., reduced)
    top = flat.amax(-1, keepdim=True)
    top = top.masked_fill(top.isinf(), 0.0)
    out = lane_stable(torch.log, ordered_sum(lane_stable(torch.exp, flat - top), -1)) + top.squeeze(-1)
    if keepdim:
        out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return out.to(x.dtype)
