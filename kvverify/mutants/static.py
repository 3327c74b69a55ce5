"""Preallocated caches with one planted bug each (parent: :class:`~kvverify.caches.StaticCache`)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches import StaticCache
from kvverify.caches._common import new_positions


class ValidLengthBeforeScatter(StaticCache):
    """onnxruntime mobius #365: the valid length is read before the new tokens are scattered in, so every
    decode step returns one token too few (the newest is missing and the rest are read one slot off)."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        valid = max(self.lengths[layer_idx], key_states.shape[-2])  # read before the scatter
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys[:, :, :valid], values[:, :, :valid]


class LastSlotWraps(StaticCache):
    """executorch #5227: off by one when the tokens exactly fill the cache; a write to the last slot is taken
    for an overflow and wraps to slot 0. Only a sequence of exactly ``max_seq_len`` tokens shows it."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = self.keys[layer_idx].shape[2]
        positions = new_positions(cache_kwargs, self.lengths[layer_idx], key_states.shape[-2], key_states.device)
        positions = torch.where(positions >= capacity - 1, positions - (capacity - 1), positions)  # should be >=
        return super().update(key_states, value_states, layer_idx, {"cache_position": positions})


class LengthFromNonzeroSlots(StaticCache):
    """transformers #30377: the length is the number of slots whose key row (batch row 0, head 0) is not all
    zeros, and new tokens are placed there; a token whose key is exactly zero (a zeroed padding embedding
    under RMSNorm, for one) is not counted, and the next token overwrites the newest slot."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys[layer_idx][0, 0].any(dim=-1).sum())

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.get_seq_length(layer_idx)
        positions = torch.arange(start, start + key_states.shape[-2], device=key_states.device)
        return super().update(key_states, value_states, layer_idx, {"cache_position": positions})


class FirstTokenNeverWritten(StaticCache):
    """TrenTorch #192: the write skips slot 0, so the first token's K/V stay zero in every layer."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = new_positions(cache_kwargs, self.lengths[layer_idx], key_states.shape[-2], key_states.device)
        written = positions > 0  # should be every position
        return super().update(
            key_states[:, :, written], value_states[:, :, written], layer_idx, {"cache_position": positions[written]}
        )


class ResetKeepsLength(StaticCache):
    """transformers #43952 (and #30351, a cache locked to its first prompt): ``reset`` clears the buffers but
    not the lengths, so the next sequence is taken for a continuation of the previous one."""

    def reset(self) -> None:
        for layer in range(len(self.keys)):
            self.keys[layer].zero_()
            self.values[layer].zero_()
