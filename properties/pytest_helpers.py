"""Running a packaged property (kvverify.checks) as a pytest test."""

from __future__ import annotations

import pytest
from hypothesis import settings

from kvverify.checks import PROPERTIES
from kvverify.checks.target import Target
from kvverify.runs import property_test
from kvverify.runs.settings import PROFILE_EXAMPLES


def check_property(name: str, target: Target) -> None:
    """Run one packaged property against a target under the loaded profile, with that property's share of
    its examples (``kvverify.runs.settings.PROPERTY_SHARE``); skip with the reason when the target lacks a method."""
    prop = PROPERTIES[name]
    missing = prop.needs - target.capabilities
    if missing:
        pytest.skip(f"{target.name} has no {', '.join(sorted(missing))}()")
    reason = prop.skip_reason(target)
    if reason is not None:
        pytest.skip(f"{target.name}: {reason}")
    profile = settings.get_current_profile_name().removeprefix("kvverify-")
    property_test(prop, target, profile=profile if profile in PROFILE_EXAMPLES else None)()
