"""A cache under test: its factory, what it declares about itself, and what it can do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvverify.compare import Tolerance, tolerance_for
from kvverify.config import ModelConfig
from kvverify.protocol import CacheDeclaration, CacheFactory, KVCache, capabilities, declaration_of

#: The configuration a target is probed with to detect its optional methods.
PROBE_CONFIG = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64,
                           max_batch_size=4)


@dataclass(frozen=True)
class Target:
    """name: how reports call it (``module:factory`` or a built-in name)."""

    name: str
    factory: CacheFactory
    declaration: CacheDeclaration = field(default_factory=CacheDeclaration)
    capabilities: frozenset[str] = frozenset()

    def new_cache(self, config: ModelConfig) -> KVCache:
        return self.factory(config)

    def tolerance(self, config: ModelConfig) -> Tolerance | None:
        """None for a bitwise comparison: strict numerics with an exact cache."""
        if self.declaration.lossy_atol is not None:
            fast = tolerance_for(config.dtype) if config.numerics == "fast" else Tolerance(atol=0.0)
            return Tolerance(atol=self.declaration.lossy_atol + fast.atol, why="declared by the cache (lossy)")
        return tolerance_for(config.dtype) if config.numerics == "fast" else None

    def config_constraints(self) -> dict[str, Any]:
        """Keyword arguments for :func:`kvverify.strategies.cases` that respect the declaration."""
        constraints: dict[str, Any] = {}
        d = self.declaration
        if d.sliding_window is not None:
            constraints["sliding_window"] = d.sliding_window
        if d.max_batch_size is not None:
            constraints["max_batch_size"] = d.max_batch_size
        if d.max_seq_len is not None:
            constraints["max_seq_len"] = min(d.max_seq_len, 64)
        return constraints


def make_target(factory: CacheFactory, name: str | None = None) -> Target:
    """Describe a factory: its declaration (on the factory or on a probe cache) and its optional methods."""
    probe = factory(PROBE_CONFIG)
    label = name or getattr(factory, "__qualname__", None) or repr(factory)
    return Target(label, factory, declaration_of(probe, factory), capabilities(probe))
