"""The registry of the properties a KV cache must keep, each a strategy of cases and a check that raises on a
violation. The properties themselves live in ``properties_*.py`` and ``stateful.py``, one area per file;
positions (RoPE, learned, ALiBi, with and without left padding) are drawn by every property's strategy and
continuing from the cache length is :data:`CONTINUATION`'s job."""

from __future__ import annotations

from kvverify.checks.properties.batch import BATCH_INDEPENDENCE
from kvverify.checks.properties.compiled import COMPILED
from kvverify.checks.properties.generation import CACHED_EQUALS_UNCACHED, CONTINUATION, check_cached_equals_uncached
from kvverify.checks.properties.long_context import LONG_CONTEXT
from kvverify.checks.properties.prefill import CHUNKED_PREFILL, SLIDING_WINDOW
from kvverify.checks.properties.reset import RESET
from kvverify.checks.properties.rollback import CROP, REORDER
from kvverify.checks.properties.stateful import STATEFUL
from kvverify.checks.property import Property, expect_same

PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        CACHED_EQUALS_UNCACHED,
        CONTINUATION,
        CHUNKED_PREFILL,
        SLIDING_WINDOW,
        BATCH_INDEPENDENCE,
        CROP,
        REORDER,
        RESET,
        STATEFUL,
        COMPILED,
    )
}

#: Properties run only when named (``--property NAME``, ``properties=[...]``) or by ``kvverify mutants``: each
#: example is expensive (a long context).
OPT_IN_PROPERTIES: dict[str, Property] = {LONG_CONTEXT.name: LONG_CONTEXT}

#: Every property, the default ones and the opt-in ones.
ALL_PROPERTIES: dict[str, Property] = {**PROPERTIES, **OPT_IN_PROPERTIES}

__all__ = ["ALL_PROPERTIES", "OPT_IN_PROPERTIES", "PROPERTIES", "Property", "check_cached_equals_uncached",
           "expect_same"]
