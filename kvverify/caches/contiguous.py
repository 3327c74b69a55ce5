"""A concatenating cache: each update appends along the sequence axis (transformers' DynamicCache)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches._common import check_layer_order
from kvverify.protocol.cache import resolve_crop
from kvverify.protocol.config import ModelConfig


class ContiguousCache:
    """Per layer, one (B, Hkv, seq, D) tensor for keys and one for values, grown by ``torch.cat``."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @classmethod
    def from_config(cls, config: ModelConfig) -> ContiguousCache:
        return cls()

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_layer_order(layer_idx, len(self.keys))
        if layer_idx == len(self.keys):
            self.keys.append(key_states.clone())
            self.values.append(value_states.clone())
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key_states), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value_states), dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.keys = [k[:, :, :keep] for k in self.keys]
        self.values = [v[:, :, :keep] for v in self.values]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]

    def reset(self) -> None:
        self.keys, self.values = [], []
