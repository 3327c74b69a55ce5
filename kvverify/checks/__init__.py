"""What is checked: the properties, the strategies they draw from, and the cache under test as they see it.

The front door for the rooms above (:mod:`kvverify.runs`, the commands, the plugin): the properties, a case and
its model, the target a property runs against and how it is made from a built-in name or ``MODULE:FACTORY``,
the device and time-limit options, the protocol checker a cache runs inside, and the tolerance measurements.
"""

from kvverify.checks.case import Case, build_model
from kvverify.checks.contract import CheckedCache, ContractViolation
from kvverify.checks.devices import DeviceError, describe_device, resolve_device
from kvverify.checks.drift import compared_difference
from kvverify.checks.loading import TargetError, load_factory, raised_at, resolve_target
from kvverify.checks.properties import ALL_PROPERTIES, OPT_IN_PROPERTIES, PROPERTIES, Property
from kvverify.checks.properties.long_context import LONG_CONTEXT, long_case
from kvverify.checks.shapes import SHAPES, default_time_limit
from kvverify.checks.strategies import cases
from kvverify.checks.target import Target, make_target
from kvverify.checks.tolerance import BACKENDS, measure, measure_target
from kvverify.checks.watchdog import DEFAULT_TIME_LIMIT, parse_time_limit

__all__ = [
    "ALL_PROPERTIES",
    "BACKENDS",
    "DEFAULT_TIME_LIMIT",
    "LONG_CONTEXT",
    "OPT_IN_PROPERTIES",
    "PROPERTIES",
    "SHAPES",
    "Case",
    "CheckedCache",
    "ContractViolation",
    "DeviceError",
    "Property",
    "Target",
    "TargetError",
    "build_model",
    "cases",
    "compared_difference",
    "default_time_limit",
    "describe_device",
    "load_factory",
    "long_case",
    "make_target",
    "measure",
    "measure_target",
    "parse_time_limit",
    "raised_at",
    "resolve_device",
    "resolve_target",
]
