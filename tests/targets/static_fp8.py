"""A cache of the kind vLLM's fp8 KV cache is: float8_e4m3fn storage with one static scale per layer for keys
and one for values (vLLM's ``k_scale`` / ``v_scale``), every token quantized on arrival and attention reading
the stored tokens, the prefill's too. It declares its own round trip (:func:`round_trip`), the way an adapter for
such a cache would, so ``cached_equals_uncached`` replays it bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify import CacheDeclaration, ModelConfig
from kvverify.protocol.quantizers import Quantizer

FP8 = torch.float8_e4m3fn


def scale_of(layer: int, is_key: bool) -> float:
    """The static scale of a layer's keys or values (made up, different per layer, as calibrated ones are)."""
    return (0.01 if is_key else 0.02) * (1 + layer)


def round_trip(states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
               requantize: bool) -> torch.Tensor:
    """(B, Hkv, T, D) through float8_e4m3fn at the layer's static scale and back."""
    scale = scale_of(layer, is_key)
    return ((states.float() / scale).to(FP8).float() * scale).to(states.dtype)


class StaticScaleFp8Cache:
    """Per layer: keys and values (B, Hkv, S, D) as float8_e4m3fn, dequantized on read."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k_scale, v_scale = scale_of(layer_idx, True), scale_of(layer_idx, False)
        keys, values = (key_states.float() / k_scale).to(FP8), (value_states.float() / v_scale).to(FP8)
        if layer_idx == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], keys), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], values), dim=-2)
        return ((self.keys[layer_idx].float() * k_scale).to(key_states.dtype),
                (self.values[layer_idx].float() * v_scale).to(value_states.dtype))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


def static_fp8(config: ModelConfig) -> StaticScaleFp8Cache:
    return StaticScaleFp8Cache()


static_fp8.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    lossy_atol=4.0, quantizer=Quantizer(kind=round_trip, scheme="append", prefill="stored"))
