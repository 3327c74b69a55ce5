"""A correct lossy cache: keys and values stored as symmetric int8 with one absmax scale per token and head.

It returns what it stores, dequantized, so cached logits differ from uncached ones by the rounding only; it
declares the tolerance ``kvverify measure-tolerance --target tests.targets.lossy:int8_per_token``
measured for it (largest 0.085, float16, over 200 cases; 0.17 with its margin of 2), with room.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify import CacheDeclaration, ModelConfig
from kvverify.caches import ContiguousCache

INT8_ATOL = 0.25


def round_trip(states: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T, D) through int8 and back: one scale per token and head, absmax / 127."""
    scale = states.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(states.dtype).tiny) / 127
    return (states / scale).round().clamp(-127, 127) * scale


class Int8PerToken(ContiguousCache):
    """The built-in concatenating cache over int8-rounded keys and values."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(round_trip(key_states), round_trip(value_states), layer_idx, cache_kwargs)


def int8_per_token(config: ModelConfig) -> Int8PerToken:
    return Int8PerToken()


int8_per_token.kvverify_declaration = CacheDeclaration(lossy_atol=INT8_ATOL)  # type: ignore[attr-defined]
