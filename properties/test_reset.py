"""After reset() a second, longer sequence ≡ uncached, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_reset(builtin_target: Target) -> None:
    check_property("reset", builtin_target)
