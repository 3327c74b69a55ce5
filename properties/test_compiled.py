"""The decode step compiled (fullgraph, dynamic=False) ≡ eager with at most one recompile after warm-up, for every
built-in cache that declares compile=True (the static one; the others skip with the reason)."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_compiled(builtin_target: Target) -> None:
    check_property("compiled", builtin_target)
