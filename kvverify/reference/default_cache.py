"""The cache :meth:`ReferenceModel.generate` uses when it is given none: per layer, keys and values joined by
``torch.cat``. The oracle's own, so that it judges caches without leaning on one of them."""

from __future__ import annotations

from typing import Any

import torch


class ReferenceCache:
    """Per layer, one (B, Hkv, seq, D) tensor for keys and one for values; only ``update`` and the length."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):  # the model writes layers in order
            self.keys.append(key_states)
            self.values.append(value_states)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key_states), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value_states), dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0
