"""torch_threads sets torch's thread count for a block and restores it, even when the block raises."""

from __future__ import annotations

import pytest
import torch

from kvverify.reference.threads import torch_threads


def test_the_count_is_set_inside_and_restored_after_an_error() -> None:
    before = torch.get_num_threads()
    inside = 2 if before == 1 else 1
    with pytest.raises(RuntimeError, match="boom"), torch_threads(inside):
        assert torch.get_num_threads() == inside
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before, "the thread count must be restored after the block"


def test_zero_threads_is_refused_with_the_count() -> None:
    with pytest.raises(ValueError, match="at least 1 thread; got 0"), torch_threads(0):
        pass
