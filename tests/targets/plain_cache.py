"""A correct concatenating KV cache written the way a cache author would, without importing kvverify."""

from __future__ import annotations

from typing import Any

import torch


class PlainCache:
    """Per layer, keys and values (batch, n_kv_heads, seq, head_dim) grown by concatenation."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key_states)
            self.values.append(value_states)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def crop(self, max_length: int) -> None:
        length = self.get_seq_length()
        keep = max(0, min(length + max_length if max_length < 0 else max_length, length))
        self.keys = [k[:, :, :keep] for k in self.keys]
        self.values = [v[:, :, :keep] for v in self.values]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.keys = [k[beam_idx] for k in self.keys]
        self.values = [v[beam_idx] for v in self.values]

    def reset(self) -> None:
        self.keys, self.values = [], []


def make_cache(config: Any) -> PlainCache:
    return PlainCache()
