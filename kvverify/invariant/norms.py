"""Layer norm and RMS norm as their fused aten kernels compute them, with left-to-right means.

(transformers' RMSNorm modules are written with ``pow``, ``mean`` and ``rsqrt`` and reach the mode as those
ops; ``aten._fused_rms_norm`` is what ``F.rms_norm`` becomes where a device has a fused kernel.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvverify.invariant.ordered import ordered_sum
from kvverify.reference.numerics import compute_dtype, lane_stable


def _rows(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """x as (..., D) in the accumulation type, D the normalized elements; and the stats' shape (..., 1, ..., 1)."""
    n = len(normalized_shape)
    if tuple(x.shape[x.dim() - n :]) != tuple(normalized_shape):
        raise ValueError(f"normalized_shape {list(normalized_shape)} must be the last dimensions of the input; "
                         f"got an input of shape {tuple(x.shape)}")
    lead = list(x.shape[: x.dim() - n])
    rows = x.to(compute_dtype(x.dtype)).reshape(*lead, math.prod(normalized_shape))
    return rows, lead + [1] * n


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the mean and rstd outputs: the input's on the CPU, float32 at least elsewhere (as torch)."""
    return x.dtype if x.device.type == "cpu" else compute_dtype(x.dtype)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten.native_layer_norm``: (normalized x, mean, 1/sqrt(var + eps)), the biased variance."""
    rows, stats = _rows(x, normalized_shape)
    d = rows.shape[-1]
    mean = ordered_sum(rows, -1)[..., None] / d
    centred = rows - mean
    rstd = lane_stable(torch.rsqrt, ordered_sum(centred * centred, -1)[..., None] / d + eps)
    out = (centred * rstd).reshape(x.shape)
    if weight is not None:
        out = out * weight.to(out.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    kind = _stats_dtype(x)
    return out.to(x.dtype), mean.reshape(stats).to(kind), rstd.reshape(stats).to(kind)


def rms_norm(
    x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None, eps: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten._fused_rms_norm``: (x / sqrt(mean(x²) + eps) * weight, the reciprocal root); eps defaults to the
    input dtype's machine epsilon, as torch's."""
    rows, stats = _rows(x, normalized_shape)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    rstd = lane_stable(torch.rsqrt, ordered_sum(rows * rows, -1)[..., None] / rows.shape[-1] + eps)
    out = (rows * rstd).reshape(x.shape)
    if weight is not None:
        out = out * weight.to(out.dtype)
    return out.to(x.dtype), rstd.reshape(stats).to(_stats_dtype(x))
