"""A symmetric int8 cache: each token's keys and values stored as int8 codes with one absmax/127 scale per
token and head, dequantized on every read (the prefill too).

It declares :data:`kvverify.protocol.quantizers.INT8_PER_TOKEN`, so ``cached_equals_uncached`` replays its loss bit for
bit, and ``INT8_ATOL`` for the properties that compare with exact recomputation.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches._common import check_layer_order
from kvverify.protocol.cache import CacheDeclaration, resolve_crop
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.quantizers import INT8_PER_TOKEN

#: Logit tolerance for the properties compared with exact recomputation (not cached_equals_uncached, which
#: replays): ``kvverify measure-tolerance --target
#: kvverify.caches.int8:Int8PerTokenCache.from_config --cases 200 --seed S`` for S in 0, 1 gave at most 0.084
#: (bfloat16), logits up to |4.7|; about 3x that.
INT8_ATOL = 0.25

_QMAX = 127.0
_TINY = torch.finfo(torch.float32).tiny


def quantize(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, T, D) -> int8 codes (B, Hkv, T, D) and float32 scales (B, Hkv, T, 1)."""
    x = states.float()
    scale = (x.abs().amax(-1, keepdim=True) / _QMAX).clamp(min=_TINY)
    return (x / scale).round().clamp(-_QMAX, _QMAX).to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes (B, Hkv, S, D) and scales (B, Hkv, S, 1) -> (B, Hkv, S, D) of ``dtype``."""
    return (codes.float() * scale).to(dtype)


class Int8PerTokenCache:
    """Per layer: key and value codes (B, Hkv, S, D) int8 and their scales (B, Hkv, S, 1) float32."""

    kvverify_declaration = CacheDeclaration(lossy_atol=INT8_ATOL, quantizer=INT8_PER_TOKEN)

    def __init__(self) -> None:
        # per layer: (key codes, key scales, value codes, value scales)
        self.layers: list[list[torch.Tensor]] = []

    @classmethod
    def from_config(cls, config: ModelConfig) -> Int8PerTokenCache:
        return cls()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_layer_order(layer_idx, len(self.layers))
        new = [*self._quantize(key_states, layer_idx, True), *self._quantize(value_states, layer_idx, False)]
        if layer_idx == len(self.layers):
            self.layers.append(new)
        else:
            self.layers[layer_idx] = [torch.cat(pair, dim=-2) for pair in zip(self.layers[layer_idx], new, strict=True)]
        key_codes, key_scales, value_codes, value_scales = self.layers[layer_idx]
        return (dequantize(key_codes, key_scales, key_states.dtype),
                dequantize(value_codes, value_scales, value_states.dtype))

    def _quantize(self, states: torch.Tensor, layer_idx: int, is_key: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' codes and scales (:func:`quantize`; a hook for the mutants)."""
        return quantize(states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx][0].shape[-2] if layer_idx < len(self.layers) else 0

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.layers = [[t[:, :, :keep] for t in layer] for layer in self.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.layers = [[t.index_select(0, beam_idx.to(t.device)) for t in layer] for layer in self.layers]

    def reset(self) -> None:
        self.layers = []
