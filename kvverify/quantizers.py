"""The standard KV-cache quantizers, declared by a lossy cache so that the oracle can apply the same loss.

A lossy cache that declares ``CacheDeclaration(quantizer=Quantizer(...))`` is compared, in the
``cached_equals_uncached`` property, not with exact recomputation within a loose ``lossy_atol``, but with the
reference model run through :class:`kvverify.suite.replay.ReplayCache`: the recomputed keys and values passed
through the declared quantizer the way the cache applies it (the newest ``residual_length`` tokens kept in full
precision, as transformers' ``QuantizedCache`` does). Where the replay reproduces the cache's arithmetic, the
comparison is bit for bit; otherwise within ``replay_atol``, measured for what the replay cannot reproduce.

Schemes (how the cache applies the quantizer over time):

- ``"requantize"``: transformers' ``QuantizedLayer`` (quanto, HQQ backends). The first update (the prefill) is
  returned as given and stored quantized; later tokens collect in a full-precision residual; when the residual
  and the new tokens reach ``residual_length``, everything returned is quantized again and the residual emptied.
- ``"append"``: transformers' ``Fp8QuantizedLayer``. One scale per tensor, calibrated on the first update (which
  is returned as given) and frozen; every later token is quantized with it and appended.

Kinds: ``"int8"``/``"int4"``/``"int2"``: asymmetric (min/max) integer quantization of groups of ``group_size``
consecutive elements along head_dim, per token and head (quanto's ``axis=0`` with a group dividing head_dim);
``"fp8"``: float8_e4m3fn with one scale per tensor (``group_size`` None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["int8", "int4", "int2", "fp8"]
Scheme = Literal["requantize", "append"]

_BITS = {"int8": 8, "int4": 4, "int2": 2}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


@dataclass(frozen=True)
class Quantizer:
    """What a lossy cache does to its keys and values (see the module docstring).

    group_size: elements per scale along head_dim (must divide head_dim); None: one scale per tensor.
    residual_length: newest tokens kept in full precision ("requantize" scheme only).
    replay_atol: logit tolerance for what the replay cannot reproduce (0: the replay is exact, compare bitwise).
    """

    kind: Kind
    scheme: Scheme = "requantize"
    group_size: int | None = None
    residual_length: int = 0
    replay_atol: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in (*_BITS, "fp8"):
            raise ValueError(f"Quantizer.kind is {self.kind!r}; expected one of int8, int4, int2, fp8.")
        if self.kind == "fp8" and self.group_size is not None:
            raise ValueError("Quantizer(kind='fp8') quantizes per tensor; leave group_size at None.")
        if self.kind != "fp8" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"Quantizer(kind={self.kind!r}) needs group_size >= 1 (elements per scale along "
                             f"head_dim); got {self.group_size!r}.")
        if self.scheme not in ("requantize", "append") or (self.scheme == "append" and self.kind != "fp8"):
            raise ValueError(f"Quantizer.scheme is {self.scheme!r}; expected 'requantize', or 'append' with fp8.")

    def supports(self, head_dim: int) -> bool:
        """Whether the groups tile this head_dim."""
        return self.group_size is None or head_dim % self.group_size == 0

    def scale_of(self, states: torch.Tensor) -> torch.Tensor:
        """fp8: the per-tensor scale calibrated on ``states``, a float32 scalar."""
        scale: torch.Tensor = (states.abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        return scale

    def round_trip(self, states: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize and dequantize ``states`` (B, Hkv, S, D); same shape and dtype. fp8 uses ``scale`` (calibrated
        on ``states`` when None)."""
        if self.kind == "fp8":
            scale = self.scale_of(states) if scale is None else scale
            return ((states.float() / scale).to(FP8).float() * scale).to(states.dtype)
        assert self.group_size is not None
        if not self.supports(states.shape[-1]):
            raise ValueError(f"group_size {self.group_size} does not divide head_dim {states.shape[-1]}")
        grouped = states.float().reshape(*states.shape[:-1], -1, self.group_size)  # (B, Hkv, S, D/G, G)
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        levels = float(2 ** _BITS[self.kind] - 1)
        step = ((high - low) / levels).clamp(min=torch.finfo(torch.float32).tiny)
        codes = ((grouped - low) / step).round().clamp(0, levels)
        return (codes * step + low).reshape(states.shape).to(states.dtype)
