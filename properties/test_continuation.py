"""Generate n, append a turn, continue m from the returned cache ≡ all at once, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_continuation(builtin_target: Target) -> None:
    check_property("continuation", builtin_target)
