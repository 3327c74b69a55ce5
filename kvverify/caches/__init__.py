"""Correct, small KV caches of the kinds people write, and a registry of their factories."""

from __future__ import annotations

from kvverify.caches.contiguous import ContiguousCache
from kvverify.caches.int8 import Int8PerTokenCache
from kvverify.caches.kivi import KiviCache
from kvverify.caches.paged import PagedCache
from kvverify.caches.sliding import SlidingWindowCache
from kvverify.caches.static import StaticCache
from kvverify.protocol.cache import CacheFactory
from kvverify.reference.inputs import register_layout_reader

#: Built-in cache factories by name; each takes a ModelConfig and returns a fresh, empty cache.
BUILTIN_CACHES: dict[str, CacheFactory] = {
    "contiguous": ContiguousCache.from_config,
    "static": StaticCache.from_config,
    "paged": PagedCache.from_config,
    "sliding": SlidingWindowCache.from_config,
}



def _held(cache: object) -> list[tuple[object, object]]:
    """(keys, values) per layer of a built-in cache: its pools, or its per-layer tensors (none for the lossy ones,
    which hold codes)."""
    keys = getattr(cache, "key_pool", None) or getattr(cache, "keys", None)
    values = getattr(cache, "value_pool", None) or getattr(cache, "values", None)
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
        return []
    return list(zip(keys, values, strict=True))


_BUILT_IN = (ContiguousCache, StaticCache, PagedCache, SlidingWindowCache, Int8PerTokenCache, KiviCache)
register_layout_reader(lambda cache: type(cache) in _BUILT_IN, _held, exact=True)

#: The lossy caches (Int8PerTokenCache, KiviCache) are not in BUILTIN_CACHES: each declares a tolerance and a
#: quantizer (kvverify.protocol.quantizers) and is verified as a target of its own, e.g.
#: ``kvverify verify kvverify.caches.kivi:kivi2_cache``.

__all__ = ["BUILTIN_CACHES", "ContiguousCache", "Int8PerTokenCache", "KiviCache", "PagedCache", "SlidingWindowCache",
           "StaticCache"]
