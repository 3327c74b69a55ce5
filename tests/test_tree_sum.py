"""The halving tree behind every strict sum: its bits depend on an element's position alone."""

from __future__ import annotations

import pytest
import torch

from kvverify.reference.numerics import tree_sum

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 100, 1000])
def test_a_row_sums_to_the_same_bits_alone_in_a_batch_and_with_trailing_zeros(dtype: torch.dtype, length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    rows = torch.randn(9, length, generator=generator, dtype=torch.float64).to(dtype)
    alone = tree_sum(rows[3:4], -1)
    assert torch.equal(tree_sum(rows, -1)[3:4], alone), "a row's sum changed with the rows beside it"
    for extra in (1, length, 3 * length + 7):
        padded = torch.cat((rows, rows.new_zeros(9, extra)), dim=-1)
        assert torch.equal(tree_sum(padded, -1)[3:4], alone), f"{extra} trailing zeros changed a row's sum"


def test_it_is_a_sum_over_the_chosen_dimension() -> None:
    x = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    for dim in range(3):
        assert torch.equal(tree_sum(x, dim), x.sum(dim)), f"tree_sum over dim {dim} is not the sum"
    assert tree_sum(x[:, :, :0], -1).shape == (2, 3)


def test_its_order_is_a_tree_not_left_to_right() -> None:
    # 1 + 1e16 - 1e16 + 1: left to right gives 1 (the first 1 is absorbed); the tree (1 + -1e16) + (1e16 + 1)
    # also rounds, but differently: the order is fixed and documented, not torch's.
    x = torch.tensor([1.0, 1e16, -1e16, 1.0], dtype=torch.float64)
    assert tree_sum(x, 0).item() == ((1.0 + -1e16) + (1e16 + 1.0))
