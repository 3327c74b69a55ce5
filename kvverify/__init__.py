"""kvverify: property-based correctness and profiling for LLM KV caches.

Names are imported on first use, so that importing :mod:`kvverify` (as pytest does for the plugin, in every
run once the package is installed) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvverify.caches import BUILTIN_CACHES, ContiguousCache, PagedCache, SlidingWindowCache, StaticCache
    from kvverify.checks import CheckedCache, ContractViolation, DeviceError, TargetError, load_factory
    from kvverify.protocol.cache import CacheDeclaration, CacheFactory, KVCache, Unsupported, capabilities
    from kvverify.protocol.config import ConfigError, ModelConfig
    from kvverify.protocol.declaration import DeclarationError
    from kvverify.reference.inputs import InputError
    from kvverify.reference.model import Generation, ReferenceModel
    from kvverify.runs import CacheCheckFailed, SuiteResult, check_cache

__version__ = "0.1.0"

_HOMES: dict[str, str] = {
    "BUILTIN_CACHES": "kvverify.caches",
    "ContiguousCache": "kvverify.caches",
    "PagedCache": "kvverify.caches",
    "SlidingWindowCache": "kvverify.caches",
    "StaticCache": "kvverify.caches",
    "ConfigError": "kvverify.protocol.config",
    "ModelConfig": "kvverify.protocol.config",
    "CheckedCache": "kvverify.checks",
    "ContractViolation": "kvverify.checks",
    "InputError": "kvverify.reference.inputs",
    "TargetError": "kvverify.checks",
    "DeviceError": "kvverify.checks",
    "load_factory": "kvverify.checks",
    "Generation": "kvverify.reference.model",
    "ReferenceModel": "kvverify.reference.model",
    "CacheDeclaration": "kvverify.protocol.cache",
    "DeclarationError": "kvverify.protocol.declaration",
    "Unsupported": "kvverify.protocol.cache",
    "CacheFactory": "kvverify.protocol.cache",
    "KVCache": "kvverify.protocol.cache",
    "capabilities": "kvverify.protocol.cache",
    "CacheCheckFailed": "kvverify.runs",
    "SuiteResult": "kvverify.runs",
    "check_cache": "kvverify.runs",
}

__all__ = [
    "BUILTIN_CACHES",
    "CacheCheckFailed",
    "CacheDeclaration",
    "CacheFactory",
    "CheckedCache",
    "ConfigError",
    "ContiguousCache",
    "ContractViolation",
    "DeclarationError",
    "DeviceError",
    "Generation",
    "InputError",
    "KVCache",
    "ModelConfig",
    "PagedCache",
    "ReferenceModel",
    "SlidingWindowCache",
    "StaticCache",
    "SuiteResult",
    "TargetError",
    "Unsupported",
    "capabilities",
    "check_cache",
    "load_factory",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kvverify' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
