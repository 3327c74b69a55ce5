"""Cached ≡ uncached for every built-in cache: bit for bit in strict numerics, within the measured
per-dtype tolerance with identical greedy tokens in fast numerics."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_cached_equals_uncached(builtin_target: Target) -> None:
    check_property("cached_equals_uncached", builtin_target)
