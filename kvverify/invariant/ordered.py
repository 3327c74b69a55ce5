"""The invariant mode's rule of summation: strictly left to right, one elementwise add per term.

A sum over K terms is ``(((+0 + t_0) + t_1) + ...) + t_{K-1}``, each ``+`` one elementwise kernel over every
output at once, and each product of a matmul one elementwise multiply before it (no fused multiply-add).
Elementwise adds and multiplies round correctly on every device and at every offset in a tensor, so an output's
bits depend only on its own terms in their order: never on the other rows, the batch, the chunking below, the
thread count or the device (a CUDA run gives the CPU's bits).

Why not the strict oracle's :func:`~kvverify.reference.numerics.tree_sum`: a halving tree pairs terms by
position, so an exact zero placed before or between the terms (a masked key's probability) changes the pairs:
``[a, 0, b, c]`` sums to ``(a + b) + c`` and ``[a, b, c, 0]`` to ``(a + c) + b``. The oracle avoids it by
gathering the visible keys to the front before its tree, which an aten kernel cannot do without a sort and a
gather of the right operand per row (M·K·N). Left to right, an exact zero changes nothing wherever it sits:
``s + 0 == s`` for any s, and the sum starts at +0 so no partial sum is ever -0 (``x + (-x)`` is +0), so a
zero of either sign leaves it unchanged. Trees remain for sums over every element of a tensor, where there is
no row to keep apart (:func:`total_sum`).

Memory is bounded by chunking: a matmul holds at most :data:`CHUNK` accumulators and as many products at once
(never M·K·N), plus a K-major copy of its operands' chunks.
"""

from __future__ import annotations

import torch

from kvverify.reference import fixed_order
from kvverify.reference.numerics import compute_dtype, tree_sum

#: Outputs accumulated at once by :func:`matmul` (and products built per step): 1 MiB of float32 each.
CHUNK = 1 << 18
#: Elements copied at once by :func:`ordered_sum` (terms × outputs), and the fewest outputs per chunk.
SUM_CHUNK, SUM_MIN_OUTPUTS = 1 << 20, 256


def ordered_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum over ``dim`` (dropped) left to right, in x's dtype (the caller casts to the accumulation type)."""
    dim = dim % x.dim() if x.dim() else 0
    if x.dim() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device) + x
    terms = x.movedim(dim, -1)  # (..., K)
    shape, length = terms.shape[:-1], terms.shape[-1]
    rows = terms.reshape(-1, length)  # (R, K)
    out = torch.zeros(rows.shape[0], dtype=x.dtype, device=x.device)  # +0: the sum's start
    step = max(SUM_MIN_OUTPUTS, SUM_CHUNK // max(length, 1))
    for r0 in range(0, rows.shape[0], step):
        column_major = rows[r0 : r0 + step].T.contiguous()  # (K, r): each term a contiguous slice
        acc = out[r0 : r0 + step]
        for k in range(length):
            acc.add_(column_major[k])
    return out.view(shape)


def total_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of every element (a 0-d tensor): the oracle's halving tree over the flattened tensor, whose
    additions are fixed by each element's position alone (there is no row to keep apart)."""
    return tree_sum(x.reshape(-1), 0)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with each output summed left to right over K in float32 at least, returned in the inputs'
    promoted dtype. a: (B, M, K), b: (B, K, N) -> (B, M, N); any strides, any device (the same for both)."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"matmul expects a (B, M, K) and b (B, K, N); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"matmul expects both operands on one device; got {a.device} and {b.device}")
    returned = torch.promote_types(a.dtype, b.dtype)
    compute = compute_dtype(returned)
    if fixed_order.applies(a, b):  # the same products and order, natively (kvverify.reference.fixed_order)
        return fixed_order.ordered_matmul(a.to(compute), b.to(compute)).to(returned)
    batch, m, n = a.shape[0], a.shape[1], b.shape[2]
    out = torch.empty((batch, m, n), dtype=returned, device=a.device)
    cols = max(1, min(n, CHUNK))
    rows = max(1, min(m, CHUNK // cols))
    batches = max(1, min(batch, CHUNK // (cols * rows)))
    for b0 in range(0, batch, batches):
        for n0 in range(0, n, cols):
            right = b[b0 : b0 + batches, :, n0 : n0 + cols].to(compute).permute(1, 0, 2).contiguous()  # (K, bb, nc)
            for m0 in range(0, m, rows):
                left = a[b0 : b0 + batches, m0 : m0 + rows].to(compute).permute(2, 0, 1).contiguous()  # (K, bb, mc)
                out[b0 : b0 + batches, m0 : m0 + rows, n0 : n0 + cols] = _accumulate(left, right)
    return out


def _accumulate(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """sum_k left[k, :, :, None] * right[k, :, None, :], left to right. left: (K, bb, mc), right: (K, bb, nc)
    -> (bb, mc, nc)."""
    k, bb, mc = left.shape
    acc = torch.zeros((bb, mc, right.shape[2]), dtype=left.dtype, device=left.device)  # +0: the sum's start
    product = torch.empty_like(acc)
    for i in range(k):
        torch.mul(left[i, :, :, None], right[i, :, None, :], out=product)  # rounded, then added: no FMA
        acc.add_(product)
    return acc
