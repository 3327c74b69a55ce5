"""A prompt fed in random chunks or token by token ≡ a one-shot prefill, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_chunked_prefill(builtin_target: Target) -> None:
    check_property("chunked_prefill", builtin_target)
