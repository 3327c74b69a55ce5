"""A compressing cache by the book: StreamingLLM's attention sinks and recent window, kept after the prefill.

After the first forward (the prefill of T tokens) each layer keeps its first ``n_sink`` tokens and the newest
``n_kept - n_sink`` of the prompt, ``n_kept = max(1, int(T * (1 - ratio)))`` (kvpress' count), and every token
written later. Kept keys stay as they were rotated, at their original positions, and ``get_seq_length()`` counts
the tokens seen. It runs in kvverify's own environment, so the eviction oracle
(:mod:`kvverify.checks.eviction`) is exercised without any compression library:
``kvverify verify kvverify.caches.sinks_window:sinks_window_cache``.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches._common import check_layer_order
from kvverify.protocol.cache import CacheDeclaration
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.eviction import Eviction

RATIO = 0.5
N_SINK = 2


class SinksWindowCache:
    """Per layer: keys, values (B, Hkv, S, D) held, and slots (S,) the original slot of each; seen: tokens written."""

    def __init__(self, ratio: float = RATIO, n_sink: int = N_SINK) -> None:
        self.ratio, self.n_sink = ratio, n_sink
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        self.seen: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_layer_order(layer_idx, len(self.keys))
        t = key_states.shape[-2]
        if layer_idx == len(self.keys):  # the prefill: attend to all of it, then keep sinks and window
            self.keys.append(key_states)
            self.values.append(value_states)
            self.slots.append(torch.arange(t, device=key_states.device))
            self.seen.append(t)
            self.compress(layer_idx)
            return key_states, value_states
        self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key_states), dim=-2)
        self.values[layer_idx] = torch.cat((self.values[layer_idx], value_states), dim=-2)
        new = torch.arange(self.seen[layer_idx], self.seen[layer_idx] + t, device=key_states.device)
        self.slots[layer_idx] = torch.cat((self.slots[layer_idx], new))
        self.seen[layer_idx] += t
        return self.keys[layer_idx], self.values[layer_idx]

    def kept_count(self, prefill: int) -> int:
        return prefill if self.ratio == 0 else max(1, int(prefill * (1 - self.ratio)))

    def compress(self, layer_idx: int) -> None:
        """Keep the sinks and the newest tokens of the prefill held by layer ``layer_idx``."""
        prefill = self.keys[layer_idx].shape[-2]
        n_kept = self.kept_count(prefill)
        sinks = min(self.n_sink, n_kept)
        keep = torch.cat((torch.arange(sinks), torch.arange(prefill - n_kept + sinks, prefill)))
        keep = keep.to(self.keys[layer_idx].device)
        self.keys[layer_idx] = self.keys[layer_idx][:, :, keep]
        self.values[layer_idx] = self.values[layer_idx][:, :, keep]
        self.slots[layer_idx] = self.slots[layer_idx][keep]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, S) long: the original slot of each token layer ``layer_idx`` holds."""
        batch, heads = self.keys[layer_idx].shape[:2]
        return self.slots[layer_idx].expand(batch, heads, -1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen[layer_idx] if layer_idx < len(self.seen) else 0

    def reset(self) -> None:
        self.keys, self.values, self.slots, self.seen = [], [], [], []


def sinks_window_cache(config: ModelConfig) -> SinksWindowCache:
    """StreamingLLM with ``N_SINK`` sinks at compression ratio ``RATIO``, declared."""
    return SinksWindowCache()


sinks_window_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    keeps=Eviction("sinks_window", RATIO, n_sink=N_SINK))
