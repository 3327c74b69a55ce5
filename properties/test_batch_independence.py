"""Row i of a left-padded batch ≡ row i generated alone, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_batch_independence(builtin_target: Target) -> None:
    check_property("batch_independence", builtin_target)
