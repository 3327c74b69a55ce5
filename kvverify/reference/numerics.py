"""Strict numerics, the reference model's oracle arithmetic (its other, fast numerics is
:mod:`kvverify.engine.kernels`; :mod:`kvverify.reference.kernels` chooses between them).

Every reduction gives one row the same bits whether it is computed alone or inside a batch of
rows, and whatever masked keys surround it. Projections are an elementwise product followed by a sum over
the innermost dimension (unlike ``F.linear``, matmul and SDPA on CPU, whose blocking changes with the row
count). Sums over keys (the softmax denominator, the weighted sum of values) run in key order with
``cumsum``, so masked keys, which contribute exact zeros, change nothing wherever they sit: a query gets the
same bits from a cache returning a ring, a preallocated buffer or a concatenation as from a full
recomputation. Cached and uncached logits are then bitwise identical, and any difference is a bug in the
cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Elementwise transcendental kernels (exp, sin, silu...) run SIMD over full vector chunks and scalar code
#: over the tail; the two can differ in the last bit, so an element's bits would depend on where it sits in
#: its tensor. Strict numerics lays every element on a full chunk: a flat buffer padded to a multiple of
#: _LANES, processed in pieces below the size at which torch splits work across threads.
_LANES = 64
_PIECE = 8192


def lane_stable(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn``, with each element computed by the same (vector) code path."""
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % _LANES
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    out = torch.cat([fn(piece) for piece in torch.split(flat, _PIECE)])
    return out[:n].view(x.shape)


def elementwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, strict: bool) -> torch.Tensor:
    return lane_stable(fn, x) if strict else fn(x)


def linear(x: torch.Tensor, weight: torch.Tensor, strict: bool) -> torch.Tensor:
    """``x @ weight.T``. x: (..., d_in), weight: (d_out, d_in) -> (..., d_out)."""
    if strict:
        return (x.unsqueeze(-2) * weight).sum(-1)
    return F.linear(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, strict: bool) -> torch.Tensor:
    """RMSNorm, computed in float32 at least (as transformers' LlamaRMSNorm does). x: (..., d)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    h = h * elementwise(torch.rsqrt, h.pow(2).mean(-1, keepdim=True) + eps, strict)
    return weight * h.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, strict: bool) -> torch.Tensor:
    """LayerNorm from row-local sums, so strict and fast agree. x: (..., d)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    mean = h.mean(-1, keepdim=True)
    centred = h - mean
    h = centred * elementwise(torch.rsqrt, centred.pow(2).mean(-1, keepdim=True) + eps, strict)
    return h.to(x.dtype) * weight + bias


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    bias: torch.Tensor | None,
    strict: bool,
) -> torch.Tensor:
    """Softmax attention with grouped-query heads, repeated here after reading the cache.

    q: (B, H, Tq, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv; visible: bool (B, 1, Tq, S), True where
    the query may attend to the key; bias: additive (B, H, Tq, S) or None. Every query row must see at least
    one key. Returns (B, H, Tq, D).
    """
    batch, n_heads, t_q, head_dim = q.shape
    n_kv_heads, s = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    if not strict:
        mask: torch.Tensor = visible
        if bias is not None:
            mask = bias.masked_fill(~visible, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    qg = q.view(batch, n_kv_heads, group, t_q, 1, head_dim)
    scores = (qg * k[:, :, None, None]).sum(-1) * scale  # (B, Hkv, group, Tq, S)
    scores = scores.reshape(batch, n_heads, t_q, s)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = lane_stable(torch.exp, scores - scores.amax(-1, keepdim=True))  # masked keys: exactly 0
    probs = weights / _ordered_sum(weights)
    probs = probs.view(batch, n_kv_heads, group, t_q, 1, s)
    out = _ordered_sum(probs * v.transpose(-1, -2)[:, :, None, None]).squeeze(-1)  # (B, Hkv, group, Tq, D)
    return out.reshape(batch, n_heads, t_q, head_dim)


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension strictly left to right (keepdim): zeros anywhere leave the bits unchanged."""
    return x.cumsum(-1)[..., -1:]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, strict: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotary embeddings (the non-interleaved layout of transformers' Llama).

    position_ids: (B, T) -> cos, sin: (B, 1, T, head_dim), computed in float32 at least.
    """
    compute = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(compute) / head_dim)
    )
    freqs = position_ids.to(compute)[..., None] * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = elementwise(torch.cos, emb, strict), elementwise(torch.sin, emb, strict)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos, sin: (B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi head slopes of Press et al., with their interpolation for head counts not a power of 2."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)
