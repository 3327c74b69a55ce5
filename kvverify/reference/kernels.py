"""The kernel set a model computes with, chosen once per model from ``config.numerics``.

``strict`` (:mod:`kvverify.reference.numerics`): batch-invariant reductions, cached and uncached logits bitwise
equal. ``fast`` (:mod:`kvverify.reference.fast`): torch's standard kernels. Both take and return the same
shapes, so the model's modules have one path each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvverify.protocol.config import ModelConfig
from kvverify.reference import fast, numerics
from kvverify.reference.context import Mask

Tensor = torch.Tensor


@dataclass(frozen=True)
class Kernels:
    """One numerics. Shapes: x (..., d); weight (d_out, d_in); q (B, H, T, D); k, v (B, Hkv, S, D)."""

    linear: Callable[[Tensor, Tensor], Tensor]  # x, weight -> x @ weight.T
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]  # x, weight, eps
    layer_norm: Callable[[Tensor, Tensor, Tensor, float], Tensor]  # x, weight, bias, eps
    silu: Callable[[Tensor], Tensor]
    rope_tables: Callable[[Tensor, int, float, torch.dtype], tuple[Tensor, Tensor]]  # positions (B, T), D, theta
    apply_rope: Callable[[Tensor, Tensor, Tensor], Tensor]  # x, *rope_tables(...)
    attention: Callable[[Tensor, Tensor, Tensor, Mask], Tensor]  # q, k, v, mask -> (B, H, T, D)


def _strict_linear(x: Tensor, weight: Tensor) -> Tensor:
    return numerics.linear(x, weight)


def _strict_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return numerics.rms_norm(x, weight, eps)


def _strict_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return numerics.layer_norm(x, weight, bias, eps)


def _strict_silu(x: Tensor) -> Tensor:
    return numerics.lane_stable(F.silu, x)


def _strict_rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return numerics.rope_tables(positions, head_dim, theta, dtype)


def _strict_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    return numerics.attention(q, k, v, *mask.tensors())


def _fast_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    causal = mask.causal
    if causal is not None:  # the geometry alone: SDPA's own masks, no tensor
        return fast.dense_attention(q, k, v, causal=causal)
    return fast.attention(q, k, v, *mask.tensors())


STRICT = Kernels(
    linear=_strict_linear,
    rms_norm=_strict_rms_norm,
    layer_norm=_strict_layer_norm,
    silu=_strict_silu,
    rope_tables=_strict_rope_tables,
    apply_rope=numerics.apply_rope,
    attention=_strict_attention,
)

FAST = Kernels(
    linear=fast.linear,
    rms_norm=fast.rms_norm,
    layer_norm=fast.layer_norm,
    silu=fast.silu,
    rope_tables=fast.rope_tables,
    apply_rope=fast.apply_rope,
    attention=_fast_attention,
)


def for_config(config: ModelConfig) -> Kernels:
    """The kernel set of ``config.numerics``."""
    return {"strict": STRICT, "fast": FAST}[config.numerics]
