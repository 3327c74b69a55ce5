"""How a run is carried out: Hypothesis settings, the runner, the child process, JUnit, repro scripts, the
example database and shards.

The front door for the commands, the plugin and :func:`check_cache`.
"""

from kvverify.runs.runner import (
    CacheCheckFailed,
    PropertyResult,
    SuiteResult,
    check_cache,
    property_test,
    run_property,
    run_suite,
)

__all__ = [
    "CacheCheckFailed",
    "PropertyResult",
    "SuiteResult",
    "check_cache",
    "property_test",
    "run_property",
    "run_suite",
]
