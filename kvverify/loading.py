"""Resolving a ``MODULE:FACTORY`` target into a cache factory, with an error that says what to do."""

from __future__ import annotations

import importlib
import os
import sys

from kvverify.protocol import CacheFactory


class TargetError(Exception):
    """The target cannot be used; the message is one paragraph naming the target, what was expected and what came."""


def load_factory(spec: str) -> CacheFactory:
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise TargetError(f"target {spec!r}: expected MODULE:FACTORY, e.g. mypkg.cache:make_cache.")
    module_name, attribute = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise TargetError(
            f"target {spec!r}: module {module_name!r} could not be imported ({type(error).__name__}: {error}). "
            "It must be importable from the current directory or PYTHONPATH."
        ) from error
    factory: object = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise TargetError(f"target {spec!r}: {attribute!r} is not defined in module {module_name!r}.")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TargetError(
            f"target {spec!r}: {attribute} is a {type(factory).__name__}, not callable; expected a function "
            "FACTORY(config) that returns a fresh cache."
        )
    return factory
