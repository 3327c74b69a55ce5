"""The largest logit difference a run saw, for a cache compared within a tolerance (a lossy cache).

:func:`watching` opens a record for one property's run; :func:`record` (called by every tolerant comparison)
keeps the largest difference; the runner reports it beside a passing verdict, so a lossy cache's owner sees
how close to its declared ``lossy_atol`` it came.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Drift:
    """largest: the largest max-abs logit difference seen (None: no tolerant comparison ran)."""

    largest: float | None = None


_LOCK = threading.Lock()
_OPEN: list[Drift] = []  # the records open now (examples may run on a watchdog thread)


@contextlib.contextmanager
def watching() -> Iterator[Drift]:
    """A record of the differences :func:`record` sees until the block ends."""
    drift = Drift()
    with _LOCK:
        _OPEN.append(drift)
    try:
        yield drift
    finally:
        with _LOCK:
            _OPEN.remove(drift)


def record(difference: float) -> None:
    """Note one comparison's max-abs logit difference in every open record (NaN and inf count as inf)."""
    value = difference if not math.isnan(difference) else math.inf
    with _LOCK:
        for drift in _OPEN:
            drift.largest = value if drift.largest is None else max(drift.largest, value)


def compared_difference(expected_logits: torch.Tensor, actual_logits: torch.Tensor,
                        expected_tokens: torch.Tensor, actual_tokens: torch.Tensor) -> float:
    """The max-abs logit difference over the steps both generations agree on (logits (B, steps, vocab), tokens
    (B, steps)): after the greedy tokens split, the two continue from different text and are not compared."""
    same = (expected_tokens == actual_tokens).all(0).long().cumprod(0)  # (steps,): 1 until the first split
    steps = int(same.sum()) + (1 if int(same.sum()) < same.numel() else 0)  # the split step is compared too
    diff = (expected_logits[:, :steps].double() - actual_logits[:, :steps].double()).abs()
    return float(diff.nan_to_num(math.inf).max()) if diff.numel() else 0.0
