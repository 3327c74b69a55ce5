"""Caches that place new tokens at the wrong slot (parent: :class:`~kvverify.caches.StaticCache`)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches import StaticCache


class PositionsRestart(StaticCache):
    """transformers #15751, #22416, mlx-lm #93: positions restart at 0 for every update instead of continuing
    from the cache length, so each decoded token overwrites slot 0."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(key_states.shape[-2], device=key_states.device)
        return super().update(key_states, value_states, layer_idx, {"cache_position": positions})


class CountAdvancedByLayerZero(StaticCache):
    """fla #477 (and mlx-lm #1699's offset mutated before use): every layer places its tokens after the
    seen-token count of layer 0, which layer 0's own write has already advanced; layers 1.. land one update
    too far."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen = self.lengths[0]
        positions = torch.arange(seen, seen + key_states.shape[-2], device=key_states.device)
        return super().update(key_states, value_states, layer_idx, {"cache_position": positions})


class OffsetAdvancedByTotal(StaticCache):
    """skyzh/tiny-llm #46: the write offset grows by the number of tokens held instead of the number written;
    right for the prefill, wrong from the second decoded token on."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, count = self.lengths[layer_idx], key_states.shape[-2]
        positions = torch.arange(start, start + count, device=key_states.device)
        keys, values = super().update(key_states, value_states, layer_idx, {"cache_position": positions})
        self.lengths[layer_idx] = start + (start + count)  # should be start + count
        return keys, values
