"""Cached ≡ uncached for every built-in cache: bit for bit in strict numerics, within the measured
per-dtype tolerance with identical greedy tokens in fast numerics."""

from __future__ import annotations

from hypothesis import given

from kvverify.suite import PROPERTIES
from kvverify.suite.target import Target

PROPERTY = PROPERTIES["cached_equals_uncached"]


def test_cached_equals_uncached(builtin_target: Target) -> None:
    @given(case=PROPERTY.strategy(builtin_target))
    def check(case: object) -> None:
        PROPERTY.check(builtin_target, case)

    check()
