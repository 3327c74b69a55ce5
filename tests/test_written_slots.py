from __future__ import annotations

import pytest
import torch

from kvverify.protocol.cache import written_slots


@pytest.mark.parametrize(
    ("returned", "total", "kept"),
    [(6, 6, 6), (7, 6, 6), (64, 6, 6), (4, 6, 4), (1, 6, 1)],  # S == N; S > N (one slot spare, many); S < N
)
def test_written_slots_follows_the_s_vs_n_rule(returned: int, total: int, kept: int) -> None:
    keys = torch.arange(returned, dtype=torch.float32).view(1, 1, returned, 1)  # slot i holds i
    values = -keys
    k, v = written_slots(keys, values, total)
    expected = torch.arange(kept, dtype=torch.float32).view(1, 1, kept, 1)  # oldest first, whatever the case
    assert torch.equal(k, expected) and torch.equal(v, -expected), f"S={returned}, N={total}: kept {k.flatten()}"
