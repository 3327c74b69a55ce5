"""How a run is carried out: Hypothesis settings, the runner, the child process, JUnit, repro scripts, the
example database and shards.

The front door for the commands, the plugin and :func:`check_cache`.
"""

from kvverify.runs.check import (
    TargetSummary,
    check_cache,
    describe_isolated,
    factory_spec,
    long_context_in_child,
    suite_in_child,
    summarize,
)
from kvverify.runs.database import DatabaseError, describe_database, open_database
from kvverify.runs.isolation import run_in_child, run_isolated
from kvverify.runs.junit import write_junit
from kvverify.runs.options import check_options
from kvverify.runs.runner import (
    CacheCheckFailed,
    PropertyResult,
    SuiteResult,
    describe_target,
    property_test,
    run_property,
    run_suite,
)
from kvverify.runs.settings import PROFILE_EXAMPLES, PROFILE_OPT_IN
from kvverify.runs.shards import ShardError, expected_cost, parse_shard
from kvverify.runs.tables import markdown_row, markdown_table, print_table, table

__all__ = [
    "PROFILE_EXAMPLES",
    "PROFILE_OPT_IN",
    "CacheCheckFailed",
    "DatabaseError",
    "PropertyResult",
    "ShardError",
    "SuiteResult",
    "TargetSummary",
    "check_cache",
    "check_options",
    "describe_database",
    "describe_isolated",
    "describe_target",
    "expected_cost",
    "factory_spec",
    "long_context_in_child",
    "markdown_row",
    "markdown_table",
    "open_database",
    "parse_shard",
    "print_table",
    "property_test",
    "run_in_child",
    "run_isolated",
    "run_property",
    "run_suite",
    "suite_in_child",
    "summarize",
    "table",
    "write_junit",
]
