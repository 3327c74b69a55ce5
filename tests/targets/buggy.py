"""Caches with one planted bug each, built on the correct PlainCache."""

from __future__ import annotations

import time
from typing import Any

import torch

from targets.plain_cache import PlainCache


class DropsOldest(PlainCache):
    """Past 8 tokens, the oldest key and value are dropped: a silent eviction bug."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if keys.shape[-2] > 8:
            return torch.cat([keys[:, :, :1] * 0, keys[:, :, 1:]], -2), values
        return keys, values


class StaleValue(PlainCache):
    """Layer 1 never updates the value of position 5 (it stays at its prefill value times two)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if layer_idx == 1 and values.shape[-2] > 5:
            values = values.clone()
            values[:, -1, 5] += 1.0
        return keys, values


class WrongArity(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> Any:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys, values, None


class RepeatsHeads(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)


class Float16(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys.half(), values.half()


class MetaDevice(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys.to("meta"), values.to("meta")


class NaNs(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if keys.shape[-2] > 3:
            values = values.clone()
            values[:, :, 2] = float("nan")
        return keys, values


class RaisesMidway(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.get_seq_length(layer_idx) >= 6:
            raise IndexError("block table full")
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


class Hangs(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.get_seq_length(layer_idx) >= 4:
            while True:
                time.sleep(0.01)
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


class ModifiesInput(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states.clone(), value_states.clone(), layer_idx, cache_kwargs)
        key_states.mul_(2)
        return keys, values


class CountsLayerZeroTwice(PlainCache):
    """get_seq_length counts the tokens of layer 0 twice once the prompt is in."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        length = super().get_seq_length(layer_idx)
        return length + 1 if length > 4 else length


class CropKeepsLength(PlainCache):
    """crop() trims the tensors but forgets nothing else... of layer 0 only."""

    def crop(self, max_length: int) -> None:
        keys0, values0 = self.keys[0], self.values[0]
        super().crop(max_length)
        self.keys[0], self.values[0] = keys0, values0


class RareLength(PlainCache):
    """Only an append of exactly 13 tokens at once (a prompt of 13, say) goes wrong: its new values come back
    doubled (the stored ones stay right). A small budget of examples finds it on some seeds and not others."""

    RARE = 13

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if key_states.shape[-2] == self.RARE:
            values = values.clone()
            values[:, :, -value_states.shape[-2]:] *= 2
        return keys, values


def _factory(cls: type[PlainCache]) -> Any:
    def make(config: Any) -> PlainCache:
        return cls()

    make.__name__ = make.__qualname__ = f"make_{cls.__name__}"
    return make


drops_oldest = _factory(DropsOldest)
stale_value = _factory(StaleValue)
wrong_arity = _factory(WrongArity)
repeats_heads = _factory(RepeatsHeads)
float16 = _factory(Float16)
meta_device = _factory(MetaDevice)
nans = _factory(NaNs)
raises_midway = _factory(RaisesMidway)
hangs = _factory(Hangs)
modifies_input = _factory(ModifiesInput)
counts_wrong = _factory(CountsLayerZeroTwice)
crop_keeps_length = _factory(CropKeepsLength)
rare_length = _factory(RareLength)
