"""kvverify: property-based correctness and profiling for LLM KV caches."""

from __future__ import annotations

from kvverify.caches import BUILTIN_CACHES, ContiguousCache, PagedCache, SlidingWindowCache, StaticCache
from kvverify.config import ConfigError, ModelConfig
from kvverify.inputs import InputError
from kvverify.model import Generation, ReferenceModel
from kvverify.protocol import CacheFactory, KVCache, capabilities

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_CACHES",
    "CacheFactory",
    "ConfigError",
    "ContiguousCache",
    "Generation",
    "InputError",
    "KVCache",
    "ModelConfig",
    "PagedCache",
    "ReferenceModel",
    "SlidingWindowCache",
    "StaticCache",
    "capabilities",
]
