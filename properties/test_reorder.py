"""reorder_cache with permutations and duplicates, then different tokens ≡ rebuilt rows, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_reorder(builtin_target: Target) -> None:
    check_property("reorder", builtin_target)
