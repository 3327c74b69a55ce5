"""Strict numerics, the reference model's oracle arithmetic (its other, fast numerics is
:mod:`kvverify.reference.fast`; :mod:`kvverify.reference.kernels` chooses between them).

One row gets the same bits whether it is computed alone or inside a batch, whatever masked keys surround it and
on whichever device it runs. Strict numerics is built only from operations whose result for an element cannot
depend on the tensor's shape: elementwise kernels, indexing (gather, sort of a bool key, cat), order-free
reductions (max, amax) and integer sums. Every floating-point sum (projections, norms, q·k, the softmax
denominator, the weighted sum of values) is :func:`tree_sum`, a fixed halving tree of elementwise adds over a
zero-padded power-of-two length, accumulated in float32 at least. Sums over keys first bring the keys a query
sees together, oldest first (the order the protocol defines), so a query gets the same bits from a cache
returning a ring, a preallocated buffer or a concatenation as from a full recomputation. Cached and uncached
logits are then bitwise identical, and any difference is a bug in the cache. (Torch's own ``sum``, ``cumsum``,
matmul and SDPA choose their order by the tensor's shape: on CUDA for all of them, on the CPU for matmul and
SDPA.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvverify.reference import fixed_order

#: On the CPU, elementwise transcendental kernels (exp, sin, silu...) run SIMD over full vector chunks and
#: scalar code over the tail; the two can differ in the last bit, so an element's bits would depend on where it
#: sits in its tensor. Strict numerics lays every element on a full chunk: a flat buffer padded to a multiple of
#: LANES, processed in pieces below the size at which torch splits work across threads. CUDA's kernels give an
#: element the same bits at any offset, so other devices call ``fn`` directly.
LANES = 64
PIECE = 8192

#: Strict products (rows × d_out × d_in, queries × keys × head_dim) are built this many elements at a time at
#: most, in chunks of rows or queries: every element is computed alone, so chunking changes no bit.
_CHUNK_ELEMENTS = 1 << 20


def lane_stable(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn``, with each element computed by the same code path on any device."""
    if x.device.type != "cpu":
        return fn(x)
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % LANES
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    if flat.numel() <= PIECE:  # one piece (a decode step's rows): no split, no cat
        return fn(flat)[:n].view(x.shape)
    out = torch.cat([fn(piece) for piece in torch.split(flat, PIECE)])
    return out[:n].view(x.shape)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``. x: (..., d_in), weight: (d_out, d_in) -> (..., d_out)."""
    if fixed_order.applies(x, weight):  # the same products and tree, natively
        compute = compute_dtype(x.dtype)
        rows = _as(x.reshape(-1, x.shape[-1]), compute)[None]
        out = fixed_order.tree_matmul(rows, _as(weight, compute).T[None])[0]
        return _as(out, x.dtype).view(*x.shape[:-1], weight.shape[0])
    return _rows_in_chunks(lambda rows: _strict_linear(rows, weight), x, weight.numel())


def _strict_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (R, d_in), weight: (d_out, d_in) -> (R, d_out): products, then a tree over d_in."""
    dtype, compute = x.dtype, compute_dtype(x.dtype)
    x, weight = _as(x, compute), _as(weight, compute)
    pad = _pow2(x.shape[-1]) - x.shape[-1]  # padded here, where it is small, rather than after the product
    if pad:  # 0 * 0: exact +0 terms, as tree_sum's own padding
        x, weight = F.pad(x, (0, pad)), F.pad(weight, (0, pad))
    products = x.T[:, :, None] * weight.T[:, None, :]  # (d_in padded, R, d_out): each tree level adds two slabs
    return _as(tree_sum(products, 0), dtype)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _pow2(n: int) -> int:
    """The power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _rows_in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, elements_per_row: int
) -> torch.Tensor:
    """``fn`` over the rows of x (..., d) -> (..., d'), a chunk of rows at a time (see _CHUNK_ELEMENTS)."""
    rows = x.reshape(-1, x.shape[-1])  # (R, d)
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_row))
    out = fn(rows) if rows.shape[0] <= step else torch.cat([fn(chunk) for chunk in torch.split(rows, step)])
    return out.view(*x.shape[:-1], out.shape[-1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Strict sums run in float32 at least (as torch's own reductions accumulate half types)."""
    return torch.promote_types(dtype, torch.float32)


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The sum over ``dim`` (dropped) as a fixed halving tree of elementwise adds: the length is zero-padded to
    a power of two and the upper half is added onto the lower until one element is left.

    The additions that make an element are fixed by its position alone, never by the tensor's shape, the
    device or the kernel's blocking; trailing zeros change no bit (a zero is added to each partial sum at the
    same place whatever the padded length), so a row of visible keys followed by any number of masked ones
    (zeros) sums to the same bits.
    """
    dim = dim % x.dim()
    length = x.shape[dim]
    if length == 0:
        return x.sum(dim)  # an empty sum: zeros of the right shape
    if length > 1 and x.dtype in (torch.float32, torch.float64) and fixed_order.applies(x):
        return fixed_order.tree_sum(x, dim)
    width = _pow2(length)
    if width != length:  # the first level against the zero padding, without building it
        width //= 2
        over = length - width  # elements of the upper half that are not padding
        first = torch.empty_like(x.narrow(dim, 0, width))
        torch.add(x.narrow(dim, 0, over), x.narrow(dim, width, over), out=first.narrow(dim, 0, over))
        torch.add(x.narrow(dim, over, width - over), 0.0, out=first.narrow(dim, over, width - over))  # + a +0 pad
        x = first
    while width > 1:
        width //= 2
        x = x.narrow(dim, 0, width) + x.narrow(dim, width, width)
    return x.squeeze(dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm, computed in float32 at least (as transformers' LlamaRMSNorm does). x: (..., d)."""
    compute = compute_dtype(x.dtype)
    h = x.to(compute)
    h = h * lane_stable(torch.rsqrt, _mean(h * h) + eps)
    return weight * h.to(x.dtype)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over the last dimension (keepdim): a tree sum divided by the length."""
    return tree_sum(x, -1)[..., None] / x.shape[-1]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm from row-local sums, so strict and fast agree. x: (..., d)."""
    compute = compute_dtype(x.dtype)
    h = x.to(compute)
    centred = h - _mean(h)
    h = centred * lane_stable(torch.rsqrt, _mean(centred * centred) + eps)
    return h.to(x.dtype) * weight + bias


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention with grouped-query heads, repeated here after reading the cache.

    q: (B, H, Tq, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv; visible: bool (B, 1, Tq, S), True where
    the query may attend to the key; bias: additive (B, H, Tq, S) or None. Every query row must see at least
    one key. Returns (B, H, Tq, D).

    Queries are taken a chunk at a time, each chunk against the span of keys from the first to the last one
    some query of the chunk sees: the keys outside it are masked for every query of the chunk, and masked keys
    only ever add exact zeros after the visible ones (see :func:`_strict_attention`), so dropping them changes
    no bit. A causal prefill of T tokens then costs T²/2 query-key pairs, and a decode step against a
    preallocated buffer only the slots written so far.
    """
    batch, n_heads, t_q, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    q, k, v, returned = _in_compute_dtype(q, k, v)  # once for every chunk
    keys = None
    if fixed_order.applies(q, k):  # the native kernel builds no products tensor: a chunk is its scores
        step = max(1, _NATIVE_ATTENTION_CHUNK // max(1, batch * n_heads * k.shape[2]))  # queries per chunk
        if step < t_q:  # the keys laid out for the kernel once, (B, Hkv, D, S), rather than per chunk
            keys = k.transpose(2, 3).contiguous()
    else:
        step = max(1, _ATTENTION_CHUNK // max(1, batch * n_heads * k.shape[2] * head_dim))
    chunks = []
    for i in range(0, t_q, step):
        seen = visible[:, :, i : i + step]
        lo, hi = _span(seen)
        chunks.append(_strict_attention(
            q[:, :, i : i + step], k[:, :, lo:hi], v[:, :, lo:hi], seen[..., lo:hi],
            None if bias is None else bias[:, :, i : i + step, lo:hi], scale, returned,
            None if keys is None else keys[..., lo:hi],
        ))  # fmt: skip
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


#: Elements (queries × keys × head_dim × heads) of one chunk of :func:`attention`: small enough that a chunk's
#: products stay in the core's cache; every element is computed alone, so the chunking changes no bit. With the
#: native kernel, scores (queries × keys × heads) of one chunk: 2 MiB in float32.
_ATTENTION_CHUNK = 1 << 20
_NATIVE_ATTENTION_CHUNK = 1 << 19


def _span(visible: torch.Tensor) -> tuple[int, int]:
    """The first and one past the last key slot that some query sees. visible: (B, 1, Tq, S) bool."""
    seen = visible.any(dim=2).any(dim=1).any(dim=0).nonzero()  # (n, 1)
    if seen.numel() == 0:
        return 0, visible.shape[-1]
    return int(seen[0]), int(seen[-1]) + 1


def _strict_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, bias: torch.Tensor | None, scale: float,
    returned: torch.dtype, keys: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`attention` in strict numerics, for a chunk of queries (shapes as there; q, k, v in the compute
    dtype, ``returned`` the dtype of the output, ``keys`` k as (B, Hkv, D, S) or None)."""
    batch, n_heads, t_q, _ = q.shape
    s = k.shape[2]
    compute = q.dtype
    scores = _scores(q, k, keys) * scale
    scores = scores.reshape(batch, n_heads, t_q, s)
    if bias is not None:
        scores = scores + bias.to(compute)
    scores = scores.masked_fill(~visible, float("-inf"))
    # The keys each query sees, brought to the front in slot order (oldest first); the masked ones follow as
    # exact zeros. Where a cache put its unwritten or evicted slots then changes no bit of the sums below.
    # When every query's visible keys already come first (a causal prefix), that order is the slots' own.
    prefix = not bool((visible[..., 1:] & ~visible[..., :-1]).any())
    order = None
    if not prefix:
        order = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices  # (B, 1, Tq, S)
        scores = scores.gather(-1, order.expand(batch, n_heads, t_q, s))
    return _softmax_values(scores, v, order, returned)


def attention_to_every_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`attention` for queries that see every key they are given, without a mask: a decode step's query
    against the keys of its window. The same bits as ``attention(q, k, v, visible, None)`` with ``visible`` all
    True, and as a longer key span whose other keys are masked (they add exact zeros after these). Shapes as
    :func:`attention`; one chunk of queries (a decode step has one)."""
    batch, n_heads, t_q, head_dim = q.shape
    q, k, v, returned = _in_compute_dtype(q, k, v)
    scores = _scores(q, k) * (1.0 / math.sqrt(head_dim))
    return _softmax_values(scores.reshape(batch, n_heads, t_q, k.shape[2]), v, None, returned)


def _in_compute_dtype(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """q, k, v in the compute dtype, and the dtype attention returns: the three promoted (a cache's dtype shows
    through)."""
    returned = torch.promote_types(q.dtype, torch.promote_types(k.dtype, v.dtype))
    compute = compute_dtype(returned)
    return q.to(compute), k.to(compute), v.to(compute), returned


def _softmax_values(scores: torch.Tensor, v: torch.Tensor, order: torch.Tensor | None,
                    returned: torch.dtype) -> torch.Tensor:
    """The softmax of scores (B, H, Tq, S), masked keys -inf and after the visible ones, against the values
    (B, Hkv, S, D) in ``order`` (see :func:`_weighted_values`) -> (B, H, Tq, D) of dtype ``returned``."""
    batch, n_heads, t_q, s = scores.shape
    n_kv_heads, head_dim = v.shape[1], v.shape[3]
    weights = lane_stable(torch.exp, scores - scores.amax(-1, keepdim=True))  # masked keys: exactly 0
    probs = weights / tree_sum(weights, -1)[..., None]  # (B, H, Tq, S)
    out = _weighted_values(probs.view(batch, n_kv_heads, n_heads // n_kv_heads, t_q, s), v, order)
    return out.reshape(batch, n_heads, t_q, head_dim).to(returned)


def _scores(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """q·k, each a tree over head_dim. q: (B, H, Tq, D), k: (B, Hkv, S, D), keys: k as (B, Hkv, D, S) or None
    -> (B, Hkv, group, Tq, S)."""
    batch, n_heads, t_q, head_dim = q.shape
    n_kv_heads, s = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    if fixed_order.applies(q, k):  # each group of query heads against its key head
        rows = q.reshape(batch * n_kv_heads, group * t_q, head_dim)
        keys = k.transpose(2, 3) if keys is None else keys
        out = fixed_order.tree_matmul(rows, keys.reshape(batch * n_kv_heads, head_dim, s))
        return out.view(batch, n_kv_heads, group, t_q, s)
    # head_dim laid out first, so each level of the tree adds two contiguous halves
    qd = q.view(batch, n_kv_heads, group, t_q, head_dim).permute(4, 0, 1, 2, 3)[..., None]
    kd = k.permute(3, 0, 1, 2)[:, :, :, None, None]  # (D, B, Hkv, 1, 1, S)
    return tree_sum(qd * kd, 0)


def _weighted_values(probs: torch.Tensor, v: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """The sum over keys of probabilities × values, a tree over the keys in each query's order.

    probs: (B, Hkv, group, Tq, S); v: (B, Hkv, S, D); order: the key slot at each place of each query's order
    (B, 1, Tq, S), or None for the slots' own -> (B, Hkv, group, Tq, D)."""
    batch, n_kv_heads, group, t_q, s = probs.shape
    head_dim = v.shape[-1]
    if fixed_order.applies(probs, v):
        if order is None:  # every query of a key head against its values
            out = fixed_order.tree_matmul(probs.reshape(batch * n_kv_heads, group * t_q, s),
                                          v.reshape(batch * n_kv_heads, s, head_dim))
            return out.view(batch, n_kv_heads, group, t_q, head_dim)
        # each query against the values in its order, read in place: one call per key head
        rows = probs.transpose(2, 3)  # (B, Hkv, Tq, group, S)
        out = torch.stack([torch.stack([
            fixed_order.tree_matmul(rows[b, h], v[b, h].expand(t_q, s, head_dim), order[b, 0])
            for h in range(n_kv_heads)]) for b in range(batch)])  # fmt: skip
        return out.transpose(2, 3)  # (B, Hkv, group, Tq, D)
    values = v[:, :, None, None]  # (B, Hkv, 1, 1, S, D)
    if order is not None:  # each query's keys in its order: (B, Hkv, 1, Tq, S, D)
        rows = order[..., None].expand(batch, n_kv_heads, t_q, s, head_dim)
        values = v[:, :, None].expand(batch, n_kv_heads, t_q, s, head_dim).gather(3, rows)[:, :, None]
    return tree_sum(probs[..., None] * values, -2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
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
    cos, sin = lane_stable(torch.cos, emb), lane_stable(torch.sin, emb)
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
