"""Sliding-window ring buffers with one planted bug each (parent: :class:`~kvverify.caches.SlidingWindowCache`)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches import SlidingWindowCache


class RollsOneStepEarly(SlidingWindowCache):
    """transformers #37574: the ring rolls when its last free slot is written, so token 0 is evicted one step
    early and an empty zero slot is left in its place. Only the query that fills the window sees it."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if self.seen[layer_idx] == self.window:  # should roll only past the window
            keys, values = keys.clone(), values.clone()
            keys[:, :, 0], values[:, :, 0] = 0, 0
        return keys, values


class KeepsWindowMinusOne(SlidingWindowCache):
    """mlx-lm #390: the cache and the mask disagree on the window by one; the cache hands back W-1 tokens
    (the new one included) where a query needs itself and the W-1 before it."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        keep = self.window - 1
        return keys[:, :, -keep:], values[:, :, -keep:]


class SlicesNewestWindow(SlidingWindowCache):
    """transformers #27682: the update returns the newest W keys of old + new, right for one new token but
    wrong for a prefill or chunk that runs past the window: its first queries lose the keys before them."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys[:, :, -self.window :], values[:, :, -self.window :]


class StartIndexWhileUnderfull(SlidingWindowCache):
    """transformers #47708: the oldest slot is taken as ``seen % window`` even while the ring is not full,
    so before the window fills the cache reads unwritten slots; once full it is right."""

    def _ordered(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen = self.seen[layer_idx]
        kept = min(seen, self.window)
        slots = (seen + torch.arange(kept, device=self.keys[layer_idx].device)) % self.window
        return self.keys[layer_idx][:, :, slots], self.values[layer_idx][:, :, slots]


class ResetKeepsPointer(SlidingWindowCache):
    """LLMs-from-scratch #925: ``reset`` empties the ring but not its write pointer, so the next sequence
    starts at the old count."""

    def reset(self) -> None:
        self.keys, self.values = [], []  # self.seen, the write pointer of each ring, is kept
