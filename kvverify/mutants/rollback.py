"""Crop, reorder and reset with one planted bug each (parent: :class:`~kvverify.caches.ContiguousCache`)."""

from __future__ import annotations

import torch

from kvverify.caches import ContiguousCache
from kvverify.protocol.cache import resolve_crop


class CropNegativeUnclamped(ContiguousCache):
    """transformers #47433: ``crop(-n)`` with n larger than the length is not clamped at 0; the negative
    length then slices from the end, so ``crop(-5)`` on 3 tokens keeps a stale token."""

    def crop(self, max_length: int) -> None:
        length = self.get_seq_length()
        keep = length + max_length if max_length < 0 else min(max_length, length)  # not clamped at 0
        self.keys = [k[:, :, :keep] for k in self.keys]
        self.values = [v[:, :, :keep] for v in self.values]


class CropZeroIsNoop(ContiguousCache):
    """transformers #47433: ``crop(0)`` does nothing, as if 0 meant "no limit"; the old sequence stays."""

    def crop(self, max_length: int) -> None:
        if max_length:  # 0 is a valid length
            super().crop(max_length)


class CropFirstLayerOnly(ContiguousCache):
    """mlx-lm #1109: rejected draft tokens stay in the cache; here ``crop`` trims layer 0 (which the length
    is read from) and leaves the drafts in every later layer."""

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        if self.keys:
            self.keys[0], self.values[0] = self.keys[0][:, :, :keep], self.values[0][:, :, :keep]


class ReorderKeysOnly(ContiguousCache):
    """transformers #48700: the reorder is applied to part of the state only; here the keys follow the beams
    and the values stay in the old row order."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]


class ReorderWrongAxis(ContiguousCache):
    """PaddleNLP #6672 (and transformers #46612): the reorder indexes the wrong axis for the layout; here the
    head axis of (batch, heads, seq, dim) instead of the batch axis."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys = [k.index_select(1, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(1, beam_idx.to(v.device)) for v in self.values]
