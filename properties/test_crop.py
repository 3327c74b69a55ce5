"""Append drafts, crop back (0 and negative arguments too), continue ≡ never appended, for every built-in cache."""

from __future__ import annotations

from pytest_helpers import check_property

from kvverify.checks.target import Target


def test_crop(builtin_target: Target) -> None:
    check_property("crop", builtin_target)
