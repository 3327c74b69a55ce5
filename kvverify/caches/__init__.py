"""Correct, small KV caches of the kinds people write, and a registry of their factories."""

from __future__ import annotations

from kvverify.caches.contiguous import ContiguousCache
from kvverify.caches.paged import PagedCache
from kvverify.caches.sliding import SlidingWindowCache
from kvverify.caches.static import StaticCache
from kvverify.protocol import CacheFactory

#: Built-in cache factories by name; each takes a ModelConfig and returns a fresh, empty cache.
BUILTIN_CACHES: dict[str, CacheFactory] = {
    "contiguous": ContiguousCache.from_config,
    "static": StaticCache.from_config,
    "paged": PagedCache.from_config,
    "sliding": SlidingWindowCache.from_config,
}

__all__ = ["BUILTIN_CACHES", "ContiguousCache", "PagedCache", "SlidingWindowCache", "StaticCache"]
