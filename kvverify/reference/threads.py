"""torch's CPU thread count, set for a block and restored after it: the one place kvverify sets it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` CPU threads within the block, then restore the count it had before.

    The suite's tensors are tiny: one thread is several times faster than two that contend with other
    processes for the same cores; timings are taken at a fixed count so that they compare."""
    if count < 1:
        raise ValueError(f"torch needs at least 1 thread; got {count}.")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
