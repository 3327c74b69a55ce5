"""A KIVI cache (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys are quantized per channel: each channel of a group of ``group_size`` consecutive tokens shares one scale
and zero point. Values are quantized per token: one scale and zero point per token and head. Both asymmetric
(min/max) at ``bits`` bits, stored as uint8 codes. The newest tokens stay in full precision: keys until
``residual_length`` of them have collected (then those are quantized, in groups, and the key residual starts
again), values while they are among the newest ``residual_length`` (each older one is quantized as it leaves).
The prefill attends to its own states in full precision, as in KIVI's code; every later update returns the
dequantized quantized part followed by the full-precision residual. ``crop`` cuts full-precision tokens only
(it refuses, with ValueError, a crop into quantized ones).

It declares :func:`~kvverify.protocol.kivi` with its parameters, so ``cached_equals_uncached`` replays its loss
bit for bit. The factories :func:`kivi2_cache` and :func:`kivi4_cache` use groups of 4 tokens and a residual of
8, scaled down from the paper's 32 and 128 so that the suite's sequences (16 to 128 tokens) cross many groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvverify.caches._common import check_layer_order
from kvverify.protocol.cache import CacheDeclaration, resolve_crop
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.quantizers import kivi

#: Logit tolerances for the properties compared with exact recomputation (not cached_equals_uncached, which
#: replays). ``kvverify measure-tolerance --target kvverify.caches.kivi:kivi2_cache --cases 200
#: --seed S`` (and kivi4_cache) for S in 0, 1 gave at most 1.02 (KIVI-2) and 0.375 (KIVI-4), logits up to |4.7|;
#: ``kvverify verify kvverify.caches.kivi:kivi2_cache --profile ci --seed 0`` saw up to 2.07 (continuation; KIVI-4:
#: 0.228). About 3x the largest.
KIVI2_ATOL = 6.0
KIVI4_ATOL = 1.0
#: The suite-sized groups and residual of the factories.
GROUP_SIZE = 4
RESIDUAL_LENGTH = 8

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class KiviCodes:
    """Quantized states: uint8 codes (B, Hkv, S, D), and the step and zero point of each scale group as float32:
    (B, Hkv, S/G, 1, D) per channel, (B, Hkv, S, 1) per token."""

    codes: torch.Tensor
    step: torch.Tensor
    low: torch.Tensor


@dataclass
class _Layer:
    """One layer: quantized keys and values, then the newest ones in full precision."""

    keys: KiviCodes
    values: KiviCodes
    key_residual: torch.Tensor  # (B, Hkv, <residual_length, D), the model's dtype
    value_residual: torch.Tensor  # (B, Hkv, <=residual_length, D)
    dtype: torch.dtype  # the model's, for the dequantized part


class KiviCache:
    """KIVI at ``bits`` bits with key groups of ``group_size`` tokens and a residual of ``residual_length``."""

    def __init__(self, bits: int, group_size: int, residual_length: int) -> None:
        if residual_length % group_size:
            raise ValueError(f"KiviCache: residual_length {residual_length} must be a multiple of group_size "
                             f"{group_size} (keys are quantized residual_length at a time, in groups).")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.levels = float(2 ** bits - 1)
        self.layers: list[_Layer] = []
        self.kvverify_declaration = CacheDeclaration(
            lossy_atol=KIVI2_ATOL if bits <= 2 else KIVI4_ATOL,
            quantizer=kivi(bits, group_size=group_size, residual_length=residual_length))

    # -- quantization ----------------------------------------------------------------------------------------

    def _asymmetric(self, x: torch.Tensor, dim: int) -> KiviCodes:
        low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        step = ((high - low) / self.levels).clamp(min=_TINY)
        codes = ((x - low) / step).round().clamp(0, self.levels).to(torch.uint8)
        return KiviCodes(codes, step, low)

    def _keys_per_channel(self, keys: torch.Tensor, layer_idx: int) -> KiviCodes:
        b, h, t, d = keys.shape
        quantized = self._asymmetric(keys.float().reshape(b, h, t // self.group_size, self.group_size, d), -2)
        return KiviCodes(quantized.codes.reshape(b, h, t, d), quantized.step, quantized.low)

    def _values_per_token(self, values: torch.Tensor, layer_idx: int) -> KiviCodes:
        return self._asymmetric(values.float(), -1)

    def _dequantized_keys(self, keys: KiviCodes, dtype: torch.dtype) -> torch.Tensor:
        b, h, s, d = keys.codes.shape
        grouped = keys.codes.float().reshape(b, h, s // self.group_size, self.group_size, d)
        return (grouped * keys.step + keys.low).reshape(b, h, s, d).to(dtype)

    @staticmethod
    def _dequantized_values(values: KiviCodes, dtype: torch.dtype) -> torch.Tensor:
        return (values.codes.float() * values.step + values.low).to(dtype)

    @staticmethod
    def _joined(old: KiviCodes, new: KiviCodes, dim: int) -> KiviCodes:
        return KiviCodes(torch.cat((old.codes, new.codes), dim=-2), torch.cat((old.step, new.step), dim=dim),
                      torch.cat((old.low, new.low), dim=dim))

    # -- the protocol ----------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_layer_order(layer_idx, len(self.layers))
        first = layer_idx == len(self.layers)
        if first:
            self.layers.append(_Layer(self._keys_per_channel(key_states[:, :, :0], layer_idx),
                                      self._values_per_token(value_states[:, :, :0], layer_idx),
                                      key_states[:, :, :0], value_states[:, :, :0], key_states.dtype))
        layer = self.layers[layer_idx]
        keys = torch.cat((layer.key_residual, key_states), dim=-2)
        full = keys.shape[-2] // self.residual_length * self.residual_length  # whole residuals: quantized now
        if full:
            layer.keys = self._joined(layer.keys, self._keys_per_channel(keys[:, :, :full], layer_idx), dim=2)
        layer.key_residual = keys[:, :, full:]
        values = torch.cat((layer.value_residual, value_states), dim=-2)
        older = max(0, values.shape[-2] - self.residual_length)  # past the residual: quantized as they leave
        if older:
            layer.values = self._joined(layer.values, self._values_per_token(values[:, :, :older], layer_idx), dim=2)
        layer.value_residual = values[:, :, older:]
        if first:  # the prefill attends to full precision
            return key_states, value_states
        return (torch.cat((self._dequantized_keys(layer.keys, layer.dtype), layer.key_residual), dim=-2),
                torch.cat((self._dequantized_values(layer.values, layer.dtype), layer.value_residual), dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        return int(layer.keys.codes.shape[-2] + layer.key_residual.shape[-2])

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (or drop ``-max_length``) where only full-precision tokens go: a
        quantized token cannot be cut from its group's scales, so a crop into them raises ValueError and changes
        nothing."""
        held = self.get_seq_length()
        keep = resolve_crop(max_length, held)
        quantized = max((max(layer.keys.codes.shape[-2], layer.values.codes.shape[-2]) for layer in self.layers),
                        default=0)
        if keep < quantized:
            raise ValueError(f"KiviCache.crop({max_length}) of {held} tokens would keep {keep}, but the first "
                             f"{quantized} are quantized; it crops within the full-precision residual only.")
        for layer in self.layers:
            layer.key_residual = layer.key_residual[:, :, :keep - layer.keys.codes.shape[-2]]
            layer.value_residual = layer.value_residual[:, :, :keep - layer.values.codes.shape[-2]]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            index = beam_idx.to(layer.key_residual.device)
            for codes in (layer.keys, layer.values):
                codes.codes, codes.step, codes.low = (t.index_select(0, index)
                                                      for t in (codes.codes, codes.step, codes.low))
            layer.key_residual = layer.key_residual.index_select(0, index)
            layer.value_residual = layer.value_residual.index_select(0, index)

    def reset(self) -> None:
        self.layers = []


def kivi2_cache(config: ModelConfig) -> KiviCache:
    """KIVI-2: 2-bit keys per channel in groups of ``GROUP_SIZE`` tokens, values per token, residual
    ``RESIDUAL_LENGTH``."""
    return KiviCache(2, GROUP_SIZE, RESIDUAL_LENGTH)


def kivi4_cache(config: ModelConfig) -> KiviCache:
    """KIVI-4: as :func:`kivi2_cache` at 4 bits."""
    return KiviCache(4, GROUP_SIZE, RESIDUAL_LENGTH)


kivi2_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    lossy_atol=KIVI2_ATOL, quantizer=kivi(2, group_size=GROUP_SIZE, residual_length=RESIDUAL_LENGTH))
kivi4_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    lossy_atol=KIVI4_ATOL, quantizer=kivi(4, group_size=GROUP_SIZE, residual_length=RESIDUAL_LENGTH))
