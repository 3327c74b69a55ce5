"""Windowed attention at W-1, W, W+1 and multiples of W, cached ≡ uncached, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_sliding_window(builtin_target: Target) -> None:
    check_property("sliding_window", builtin_target)
