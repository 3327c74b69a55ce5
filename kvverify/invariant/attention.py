"""Scaled dot-product attention decomposed into the mode's own matmul and softmax, a chunk of queries at a time.

``F.scaled_dot_product_attention`` chooses a fused kernel by device, dtype and shape (flash or memory-efficient
on CUDA, a flash kernel on the CPU), each summing keys in its own blocked order; the mode routes the call here
instead, on every device. Geometry as torch's: ``is_causal`` is top-left aligned (query i sees keys 0..i); a
bool ``attn_mask`` is True where the query may attend, a float one is added to the scores; grouped-query heads
are repeated (``enable_gqa``). A query that sees no key gets zeros, as torch's math kernel gives.

Queries are taken :data:`QUERY_CHUNK` scores at a time, each chunk against the span of keys from the first to
the last one some query of the chunk sees (known from ``is_causal`` or a bool mask): the keys outside it would
only add exact zeros, so dropping them changes no bit, and a causal prefill costs about half the products.
"""

from __future__ import annotations

import math

import torch

from kvverify.invariant import ordered
from kvverify.invariant.reductions import logsumexp, softmax
from kvverify.reference.numerics import compute_dtype

#: Scores (batch × heads × queries × keys) of one chunk of queries: 2 MiB of float32.
QUERY_CHUNK = 1 << 19


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    with_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention`` and, with ``with_lse``, the log-sum-exp of each query's scaled scores.

    query: (..., H, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev), H a multiple of Hkv when they
    differ; attn_mask broadcastable to (..., H, L, S). Returns (..., H, L, Ev) in the query's dtype, and the
    log-sum-exp as (..., H, L) float32 (or None).
    """
    if dropout_p:
        raise ValueError(f"the batch-invariant mode computes attention for inference: dropout_p must be 0, got "
                         f"{dropout_p}. Call the model in eval mode (model.eval()).")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch): pass one of them")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(f"query, key and value need at least 2 dimensions (..., length, features); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    key, value = _repeat_heads(query, key, enable_gqa), _repeat_heads(query, value, enable_gqa)
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])  # type: ignore[no-untyped-call]
    length, n_keys, features = query.shape[-2], key.shape[-2], value.shape[-1]
    compute = compute_dtype(query.dtype)
    q, k, v = (_flat(t.to(compute), lead) for t in (query, key, value))  # (B, L, E), (B, S, E), (B, S, Ev)
    mask = None if attn_mask is None else attn_mask.expand(*lead, length, n_keys)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    step = max(1, QUERY_CHUNK // max(1, q.shape[0] * n_keys))
    outs, lses = [], []
    for i in range(0, length, step):
        chunk = None if mask is None else _flat(mask[..., i : i + step, :], lead)  # (B, lc, S)
        lo, hi = _span(chunk, is_causal, i + min(step, length - i), n_keys)
        scores = ordered.matmul(q[:, i : i + step], k[:, lo:hi].transpose(1, 2)) * scale  # (B, lc, hi - lo)
        if is_causal:
            rows = torch.arange(i, i + scores.shape[1], device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(lo, hi, device=q.device) > rows, float("-inf"))
        elif chunk is not None and chunk.dtype == torch.bool:
            scores = scores.masked_fill(~chunk[..., lo:hi], float("-inf"))
        elif chunk is not None:
            scores = scores + chunk[..., lo:hi].to(compute)
        outs.append(ordered.matmul(softmax(scores, -1, safe=True), v[:, lo:hi]))  # (B, lc, Ev)
        if with_lse:
            lses.append(logsumexp(scores, -1).to(torch.float32))
    out = torch.cat(outs, 1).view(*lead, length, features).to(query.dtype)
    return out, (torch.cat(lses, 1).view(*lead, length) if with_lse else None)


def _repeat_heads(query: torch.Tensor, kv: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """Key or value with its heads (dim -3) repeated to the query's, where grouped-query attention asks it."""
    if query.dim() < 3 or kv.dim() < 3 or kv.shape[-3] == query.shape[-3]:
        return kv
    heads, kv_heads = query.shape[-3], kv.shape[-3]
    if not enable_gqa or heads % kv_heads:
        raise ValueError(f"query has {heads} heads and key/value {kv_heads}: pass enable_gqa=True with a "
                         f"number of query heads that is a multiple of the key/value heads")
    return kv.repeat_interleave(heads // kv_heads, dim=-3)


def _flat(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """t (..., X, Y) broadcast to ``lead`` and flattened to (B, X, Y)."""
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def _span(mask: torch.Tensor | None, is_causal: bool, end: int, n_keys: int) -> tuple[int, int]:
    """The first and one past the last key some query of the chunk sees (queries up to ``end``, exclusive)."""
    if is_causal:
        return 0, max(1, min(end, n_keys))
    if mask is None or mask.dtype != torch.bool:
        return 0, n_keys
    seen = mask.any(dim=1).any(dim=0).nonzero()  # (n, 1)
    if seen.numel() == 0:
        return 0, n_keys
    return int(seen[0]), int(seen[-1]) + 1
