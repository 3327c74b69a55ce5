"""Random append / crop / reorder / reset / fork programs ≡ a list-of-tensors model cache, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_stateful(builtin_target: Target) -> None:
    check_property("stateful", builtin_target)
