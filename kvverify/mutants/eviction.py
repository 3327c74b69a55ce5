"""Compressing caches with one planted bug each, for the eviction oracle (parent:
:class:`~kvverify.caches.sinks_window.SinksWindowCache`, declared ``keeps=Eviction("sinks_window", ...)``).

They are not in :data:`~kvverify.mutants.catalogue.MUTANTS`, whose entries reproduce reported bugs of built-in
cache kinds; ``tests/test_eviction_oracle.py`` checks that each is killed, and each is a target:
``kvverify verify kvverify.mutants.eviction:rerotates_kept``.
"""

from __future__ import annotations

import torch

from kvverify.caches.sinks_window import SinksWindowCache, sinks_window_cache
from kvverify.protocol.config import ModelConfig
from kvverify.reference.numerics import rope_tables, rotate_half


class RerotatesKept(SinksWindowCache):
    """Keeps the right tokens but moves them to new positions: each kept key is rotated from its original
    position p to its index i among the kept (StreamingLLM's paper; kvpress' KeyRerotationPress), so a query
    sees it at distance ``q - i``, not ``q - p``. Shows under RoPE, once a token was evicted before a kept one."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def compress(self, layer_idx: int) -> None:
        super().compress(layer_idx)
        if self.config.positional != "rope":
            return
        keys, slots = self.keys[layer_idx], self.slots[layer_idx]  # (B, Hkv, S, D), (S,)
        shift = torch.arange(slots.shape[0], device=slots.device) - slots  # (S,): new position - old
        cos, sin = rope_tables(shift[None], self.config.head_dim, self.config.rope_theta, keys.dtype)  # (1,1,S,D)
        wide = keys.to(cos.dtype)
        self.keys[layer_idx] = (wide * cos + rotate_half(wide) * sin).to(keys.dtype)


class KeepsOneTooFew(SinksWindowCache):
    """Keeps one token fewer than the declared count: the oldest token of the recent window goes too."""

    def kept_count(self, prefill: int) -> int:
        return max(1, super().kept_count(prefill) - 1)


class CountsKept(SinksWindowCache):
    """Keeps the right tokens, but ``get_seq_length()`` counts the kept ones (a compressed transformers cache's
    behaviour): a decoder that takes the next position from it rotates new tokens at the wrong positions."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


def rerotates_kept(config: ModelConfig) -> RerotatesKept:
    return RerotatesKept(config)


def keeps_one_too_few(config: ModelConfig) -> KeepsOneTooFew:
    return KeepsOneTooFew()


def counts_kept(config: ModelConfig) -> CountsKept:
    return CountsKept()


_CLAIMED = sinks_window_cache.kvverify_declaration  # type: ignore[attr-defined]  # what they claim to do
rerotates_kept.kvverify_declaration = _CLAIMED  # type: ignore[attr-defined]
keeps_one_too_few.kvverify_declaration = _CLAIMED  # type: ignore[attr-defined]
counts_kept.kvverify_declaration = _CLAIMED  # type: ignore[attr-defined]
