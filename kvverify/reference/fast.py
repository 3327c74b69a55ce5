"""The fast numerics: torch's standard kernels (``F.linear``, ``F.scaled_dot_product_attention``, fused norms),
as benchmarks time them. The reference model's fast kernel set (:data:`kvverify.reference.kernels.FAST`) and
the decode step (:mod:`kvverify.engine.decode`) are built from these. Shapes as in
:mod:`kvverify.reference.numerics`; unlike strict numerics, a row's bits may depend on its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Dtypes whose norms run the fused formulas below; reduced precision computes in float32, as transformers does.
FULL_PRECISION = (torch.float32, torch.float64)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``. x: (..., d_in), weight: (d_out, d_in) -> (..., d_out)."""
    return F.linear(x, weight)


def linear_t(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` from the transposed weight (d_in, d_out): on CPU the faster layout for few rows."""
    return torch.matmul(x, weight_t)


def rms_unit(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight in float32 or float64, ``x * rsqrt(eps + |x|^2 / d)`` in five kernels where
    ``F.rms_norm`` on CPU launches a dozen. x: (..., d); eps: 0-d, of x's dtype and device."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    return x * torch.rsqrt(torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm. x: (..., d)."""
    if x.dtype in FULL_PRECISION:
        return rms_unit(x, x.new_full((), eps)) * weight
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm: torch's fused kernel in float32 or float64. x: (..., d)."""
    if x.dtype in FULL_PRECISION:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x.float()
    centred = h - h.mean(-1, keepdim=True)
    h = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) * weight + bias


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin for :func:`apply_rope`, ``rotate_half(x) * sin == swap_halves(x) * signed_sin``.

    position_ids: (B, T) -> cos, signed sin: (B, 1, T, head_dim), computed in float32 at least.
    """
    compute = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(compute) / head_dim
    freqs = position_ids.to(compute)[..., None] * (1.0 / theta**exponents)  # (B, T, head_dim / 2)
    cos, sin = freqs.cos(), freqs.sin()
    cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, None], signed_sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in three kernels. x: (B, heads, T, D); cos, signed_sin: (B or 1, 1, T, D) or (D,)."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # halves swapped
    return torch.addcmul(x * cos, swapped, signed_sin)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """SDPA with a mask. q: (B, H, T, D); k, v: (B, Hkv, S, D); visible: (B, 1, T, S) bool; bias: (B, H, T, S)
    additive or None -> (B, H, T, D)."""
    mask = visible if bias is None else bias.masked_fill(~visible, float("-inf")).to(q.dtype)
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=_scale(q), enable_gqa=group > 1)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """SDPA without a mask tensor: every key visible, or (``causal``) the square causal mask, where top-left and
    bottom-right alignment agree. q: (B, H, T, D); k, v: (B, Hkv, S, D) -> (B, H, T, D)."""
    batch, n_heads, t_q, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    if t_q == 1 and not causal:  # one query per head: a group's queries become rows against their shared KV head
        rows = q.view(batch, n_kv_heads, group, head_dim)
        out = F.scaled_dot_product_attention(rows, k, v, scale=_scale(q))  # (B, Hkv, group, D)
        return out.view(batch, n_heads, 1, head_dim)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=_scale(q), enable_gqa=group > 1)


def _scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])
