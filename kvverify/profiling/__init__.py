"""Measurement helpers and the report of ``kvverify profile``.

:mod:`~kvverify.profiling.timing` (wall clock, side-by-side ratios), :mod:`~kvverify.profiling.hostmem`
(bytes held, memray peaks and churn), :mod:`~kvverify.profiling.replay` (a cache's updates without the model),
:mod:`~kvverify.profiling.cuda` (GPU peaks and snapshots), :mod:`~kvverify.profiling.plan` and
:mod:`~kvverify.profiling.runner` (what to measure, and measuring it), :mod:`~kvverify.profiling.report`
and :mod:`~kvverify.profiling.plots` (the report). Heavy libraries are imported where they are used.
"""

from __future__ import annotations

from kvverify.profiling.hostmem import Allocations, held_bytes, memray_allocations
from kvverify.profiling.plan import FULL, QUICK, CacheSpec, Plan
from kvverify.profiling.results import CacheRow, Profile, RatioRow

__all__ = [
    "FULL",
    "QUICK",
    "Allocations",
    "CacheRow",
    "CacheSpec",
    "Plan",
    "Profile",
    "RatioRow",
    "held_bytes",
    "memray_allocations",
]
