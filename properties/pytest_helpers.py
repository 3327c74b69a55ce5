"""Running a packaged property (kvverify.suite) as a pytest test."""

from __future__ import annotations

import pytest
from hypothesis import settings

from kvverify.suite import PROPERTIES, property_test
from kvverify.suite.settings import PROFILE_EXAMPLES
from kvverify.suite.target import Target


def check_property(name: str, target: Target) -> None:
    """Run one packaged property against a target under the loaded profile, with that property's share of
    its examples (``kvverify.suite.settings.PROPERTY_SHARE``); skip with the reason when the target lacks a method."""
    prop = PROPERTIES[name]
    missing = prop.needs - target.capabilities
    if missing:
        pytest.skip(f"{target.name} has no {', '.join(sorted(missing))}()")
    reason = prop.skip_reason(target)
    if reason is not None:
        pytest.skip(f"{target.name}: {reason}")
    profile = settings.get_current_profile_name().removeprefix("kvverify-")
    property_test(prop, target, profile=profile if profile in PROFILE_EXAMPLES else None)()
