"""A sliding-window ring buffer (Mistral's rolling cache, transformers' sliding-window layers)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches._common import check_layer_order
from kvverify.protocol.cache import resolve_crop
from kvverify.protocol.config import ModelConfig


class SlidingWindowCache:
    """Per layer, a ring of ``window`` slots; token ``p`` lives in slot ``p % window``.

    An update returns the newest ``min(seen, window)`` tokens in order followed by the new ones, so a prefill
    or chunk longer than the window still sees, for every query, the W-1 keys before it. Memory stays at
    ``window`` tokens per layer whatever the length.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1; got {window}")
        self.window = window
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.seen: list[int] = []

    @classmethod
    def from_config(cls, config: ModelConfig) -> SlidingWindowCache:
        """A ring of ``config.sliding_window`` slots (``max_seq_len`` for a model without a window)."""
        return cls(config.sliding_window or config.max_seq_len)

    def _ordered(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens of a layer, oldest first: (B, Hkv, min(seen, window), D)."""
        seen = self.seen[layer_idx]
        kept = min(seen, self.window)
        slots = torch.arange(seen - kept, seen, device=self.keys[layer_idx].device) % self.window
        return self.keys[layer_idx][:, :, slots], self.values[layer_idx][:, :, slots]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_layer_order(layer_idx, len(self.keys))
        batch, heads, count, dim = key_states.shape
        if layer_idx == len(self.keys):
            shape = (batch, heads, self.window, dim)
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
            self.seen.append(0)
        old_keys, old_values = self._ordered(layer_idx)
        seen = self.seen[layer_idx]
        written = min(count, self.window)  # only the newest `window` of the new tokens survive
        slots = torch.arange(seen + count - written, seen + count, device=key_states.device) % self.window
        self.keys[layer_idx][:, :, slots] = key_states[:, :, count - written :]
        self.values[layer_idx][:, :, slots] = value_states[:, :, count - written :]
        self.seen[layer_idx] = seen + count
        return torch.cat((old_keys, key_states), dim=-2), torch.cat((old_values, value_states), dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen[layer_idx] if layer_idx < len(self.seen) else 0

    def crop(self, max_length: int) -> None:
        """Possible while nothing has been evicted; after the ring wrapped the dropped tokens are gone."""
        seen = self.get_seq_length()
        keep = resolve_crop(max_length, seen)
        if keep < seen and seen > self.window:
            raise ValueError(
                f"cannot crop a sliding window of {self.window} to {keep} tokens after {seen} were seen: "
                "the tokens it would need again were evicted"
            )
        self.seen = [min(s, keep) for s in self.seen]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]

    def reset(self) -> None:
        self.keys, self.values, self.seen = [], [], []
