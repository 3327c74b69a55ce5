"""The oracle of a lossy cache that declares its quantizer: the same loss, replayed on recomputed keys and values.

:class:`ReplayCache` is a trivially correct quantized cache: it stores what the model recomputes and returns it
passed through the declared :class:`~kvverify.protocol.quantizers.Quantizer` by the declared scheme. The reference model
generating through it is the expected side of :func:`check_replayed`; the cache under test must match it bit for
bit in strict numerics (or within ``replay_atol`` plus fast numerics' tolerance), so an error far below the
quantizer's own (a 1% scale error on one value) is found, where a tolerance wide enough for the quantizer's
error would hide it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kvverify.checks.case import Case
from kvverify.checks.property import expect_same
from kvverify.checks.target import Target
from kvverify.engine.generation import generate
from kvverify.protocol.quantizers import Quantizer


class _Stream:
    """One layer's keys or values: the dequantized stored part (B, Hkv, Sq, D) holding positions 0..Sq-1, the
    full-precision residual (B, Hkv, Sr, D) holding the next Sr, and for fp8 the frozen scale."""

    def __init__(self, quantizer: Quantizer, layer: int, is_key: bool, first: torch.Tensor) -> None:
        self.quantizer, self.layer, self.is_key = quantizer, layer, is_key
        self.scale = quantizer.scale_of(first) if quantizer.kind == "fp8" else None
        self.stored, self.residual = first[:, :, :0], first[:, :, :0]

    def _round_trip(self, states: torch.Tensor, start: int, requantize: bool) -> torch.Tensor:
        positions = torch.arange(start, start + states.shape[-2], device=states.device)
        # fp8: the scale frozen at the first update; calibrated afresh on what a flush quantizes again
        return self.quantizer.apply(states, positions=positions, layer=self.layer, is_key=self.is_key,
                                    requantize=requantize, scale=None if requantize else self.scale)

    def update(self, new: torch.Tensor) -> torch.Tensor:
        """Take ``new`` (B, Hkv, T, D) as the cache would and return what it then holds, oldest first."""
        q, held, first = self.quantizer, self.stored.shape[-2], self.stored.shape[-2] + self.residual.shape[-2] == 0
        if q.scheme == "append":
            self.stored = torch.cat((self.stored, self._round_trip(new, held, requantize=False)), dim=-2)
        elif q.scheme == "requantize":
            returned = torch.cat((self.stored, self.residual, new), dim=-2)
            if first:
                self.stored = self._round_trip(new, 0, requantize=False)
            elif self.residual.shape[-2] + new.shape[-2] >= q.residual_length:
                self.stored, self.residual = self._round_trip(returned, 0, requantize=True), new[:, :, :0]
            else:
                self.residual = torch.cat((self.residual, new), dim=-2)
            if not first:
                return returned
        else:  # kivi: keys leave the residual residual_length at a time, values once residual_length are newer
            residual = torch.cat((self.residual, new), dim=-2)
            length = residual.shape[-2]
            leaving = length - length % q.residual_length if self.is_key else max(0, length - q.residual_length)
            if leaving:
                quantized = self._round_trip(residual[:, :, :leaving], held, requantize=False)
                self.stored = torch.cat((self.stored, quantized), dim=-2)
            self.residual = residual[:, :, leaving:]
        if first and q.prefill == "given":
            return new
        return torch.cat((self.stored, self.residual), dim=-2)


class ReplayCache:
    """A quantized cache by the book, for the declared quantizer (see :mod:`kvverify.protocol.quantizers`' schemes)."""

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer
        self.layers: list[tuple[_Stream, _Stream]] = []
        self.lengths: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.layers):
            self.layers.append((_Stream(self.quantizer, layer_idx, True, key_states),
                                _Stream(self.quantizer, layer_idx, False, value_states)))
            self.lengths.append(0)
        self.lengths[layer_idx] += key_states.shape[-2]
        keys, values = self.layers[layer_idx]
        return keys.update(key_states), values.update(value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def reset(self) -> None:
        self.layers, self.lengths = [], []


def check_replayed(target: Target, case: Case, quantizer: Quantizer) -> None:
    """Generation through the cache ≡ generation through :class:`ReplayCache` of the declared quantizer."""
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    expected = generate(model, prompt, case.max_new_tokens, cache=ReplayCache(quantizer), attention_mask=mask)
    actual = generate(model, prompt, case.max_new_tokens, cache=target.new_cache(case.config), attention_mask=mask)
    # bitwise for an exact replay in strict numerics; else replay_atol (plus fast numerics' tolerance)
    atol = quantizer.replay_atol or None
    replayed = replace(target, declaration=replace(target.declaration, lossy_atol=atol))
    expect_same(replayed, case, expected, actual,
                f"cached generation differs from the reference through the declared quantizer {quantizer}",
                label="generation through the replayed quantizer")
