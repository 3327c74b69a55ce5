"""The property suite: properties, targets and the runner."""

from kvverify.suite.properties import PROPERTIES, Property
from kvverify.suite.runner import (
    CacheCheckFailed,
    PropertyResult,
    SuiteResult,
    check_cache,
    property_test,
    run_property,
    run_suite,
)
from kvverify.suite.target import Target, make_target

__all__ = [
    "PROPERTIES",
    "CacheCheckFailed",
    "Property",
    "PropertyResult",
    "SuiteResult",
    "Target",
    "check_cache",
    "make_target",
    "property_test",
    "run_property",
    "run_suite",
]
