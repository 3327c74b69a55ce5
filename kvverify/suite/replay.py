"""The oracle of a lossy cache that declares its quantizer: the same loss, replayed on recomputed keys and values.

:class:`ReplayCache` is a trivially correct quantized cache: it stores what the model recomputes and returns it
passed through the declared :class:`~kvverify.quantizers.Quantizer` by the declared scheme. The reference model
generating through it is the expected side of :func:`check_replayed`; the cache under test must match it bit for
bit in strict numerics (or within ``replay_atol`` plus fast numerics' tolerance), so an error far below the
quantizer's own (a 1% scale error on one value) is found, where a tolerance wide enough for the quantizer's
error would hide it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kvverify.quantizers import Quantizer
from kvverify.suite.case import Case
from kvverify.suite.property import expect_same
from kvverify.suite.target import Target


class _Layer:
    """One layer's state: the dequantized stored part (B, Hkv, Sq, D), the full-precision residual (B, Hkv, Sr, D)
    and, for fp8, the frozen scale."""

    def __init__(self, stored: torch.Tensor, scale: torch.Tensor | None) -> None:
        self.stored, self.scale = stored, scale
        self.residual = stored[:, :, :0]


class ReplayCache:
    """A quantized cache by the book, for the declared quantizer (see :mod:`kvverify.quantizers`' schemes)."""

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer
        self.layers: list[tuple[_Layer, _Layer]] = []
        self.lengths: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.layers):  # the first update: returned as given, stored quantized
            self.layers.append((self._first(key_states), self._first(value_states)))
            self.lengths.append(key_states.shape[-2])
            return key_states, value_states
        self.lengths[layer_idx] += key_states.shape[-2]
        keys, values = self.layers[layer_idx]
        return self._next(keys, key_states), self._next(values, value_states)

    def _first(self, states: torch.Tensor) -> _Layer:
        scale = self.quantizer.scale_of(states) if self.quantizer.kind == "fp8" else None
        return _Layer(self.quantizer.round_trip(states, scale), scale)

    def _next(self, layer: _Layer, new: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if q.scheme == "append":
            layer.stored = torch.cat((layer.stored, q.round_trip(new, layer.scale)), dim=-2)
            return layer.stored
        returned = torch.cat((layer.stored, layer.residual, new), dim=-2)
        if layer.residual.shape[-2] + new.shape[-2] >= q.residual_length:
            layer.stored, layer.residual = q.round_trip(returned), new[:, :, :0]
        else:
            layer.residual = torch.cat((layer.residual, new), dim=-2)
        return returned

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def reset(self) -> None:
        self.layers, self.lengths = [], []


def check_replayed(target: Target, case: Case, quantizer: Quantizer) -> None:
    """Generation through the cache ≡ generation through :class:`ReplayCache` of the declared quantizer."""
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    expected = model.generate(prompt, case.max_new_tokens, cache=ReplayCache(quantizer), attention_mask=mask)
    actual = model.generate(prompt, case.max_new_tokens, cache=target.new_cache(case.config), attention_mask=mask)
    # bitwise for an exact replay in strict numerics; else replay_atol (plus fast numerics' tolerance)
    atol = quantizer.replay_atol or None
    replayed = replace(target, declaration=replace(target.declaration, lossy_atol=atol))
    expect_same(replayed, case, expected, actual,
                f"cached generation differs from the reference through the declared quantizer {quantizer}",
                label="generation through the replayed quantizer")
