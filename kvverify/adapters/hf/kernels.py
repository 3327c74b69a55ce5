"""Batch-invariant CPU kernels: with them, transformers' cached and uncached logits agree bit for bit."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _ordered_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., M, K) @ b (..., K, N), summed over K strictly left to right: the same bits for a row whatever
    the number of rows, and trailing zeros (masked keys) change nothing."""
    products = a.unsqueeze(-1) * b.unsqueeze(-3)  # (..., M, K, N)
    if products.shape[-2] == 0:
        return products.sum(-2)
    return products.cumsum(-2).select(-2, -1)


def _ordered_addmm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    return beta * bias + alpha * _ordered_matmul(a, b)


def _ordered_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    x = x.float() if half_to_float else x
    weights = torch.exp(x - x.amax(dim, keepdim=True))
    return weights / weights.cumsum(dim).narrow(dim, weights.shape[dim] - 1, 1)


@contextmanager
def batch_invariant_cpu() -> Iterator[None]:
    """Within the block, aten ``mm``, ``addmm``, ``bmm`` and ``_softmax`` on CPU reduce in a fixed order (an
    elementwise product, then a cumulative sum), as the strict numerics of the reference model do. With
    eager attention, transformers' cached and uncached logits then agree bit for bit: linear layers
    (mm/addmm) no longer depend on how many rows are computed at once, and attention (bmm, softmax) no longer
    on how many masked keys pad the row. Memory grows to M*K*N per product: for tiny models only."""
    library: Any = torch.library.Library("aten", "IMPL")  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel"
            library.impl("mm", _ordered_matmul, "CPU")
            library.impl("bmm", _ordered_matmul, "CPU")
            library.impl("addmm", _ordered_addmm, "CPU")
            library.impl("_softmax", _ordered_softmax, "CPU")
        yield
    finally:
        library._destroy()
