"""What is checked: the properties, the strategies they draw from, and the cache under test as they see it.

The front door for the rooms above (:mod:`kvverify.runs`, the commands, the plugin): a property, the target it
runs against, and how a target is made from a factory.
"""

from kvverify.checks.loading import TargetError, load_factory
from kvverify.checks.properties import PROPERTIES, Property
from kvverify.checks.target import Target, make_target

__all__ = ["PROPERTIES", "Property", "Target", "TargetError", "load_factory", "make_target"]
