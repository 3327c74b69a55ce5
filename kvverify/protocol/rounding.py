"""The built-in round trips: integer quantization per token or per channel, symmetric or asymmetric.

Each is a :class:`~kvverify.protocol.quantizers.RoundTrip`
(``rounding(states, positions=, layer=, is_key=, requantize=)``) whose arithmetic is documented here step by
step, so that a cache written against the same formulas replays bit for bit. Everything is computed in
float32 and the result cast back to the states' dtype.

Asymmetric (min/max), ``levels = 2**bits - 1``, over each group::

    low, high = group.amin(), group.amax()
    step = ((high - low) / levels).clamp(min=float32 tiny)
    codes = ((x - low) / step).round().clamp(0, levels)          # stored as uint8
    dequantized = codes * step + low

Symmetric (absmax), ``qmax = 2**(bits - 1) - 1`` (127 for int8), over each group::

    scale = (group.abs().amax() / qmax).clamp(min=float32 tiny)
    codes = (x / scale).round().clamp(-qmax, qmax)                # stored as int8
    dequantized = codes * scale

Axes (what one scale covers, per batch row and KV head):

- ``"token"``: one token's ``group_size`` consecutive elements along head_dim (None: all of head_dim);
- ``"channel"``: one channel over ``group_size`` consecutive tokens along the sequence (None: all the tokens
  given), as KIVI quantizes keys; the tokens given must then be a whole number of groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from kvverify.protocol.quantizers import RoundTrip

Axis = Literal["token", "channel"]

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Rounding:
    """A built-in round trip: ``bits``-bit integers, one scale per group along ``axis`` (module docstring).

    >>> Rounding(bits=8, axis="token", symmetric=True)       # absmax / 127 per token and head
    >>> Rounding(bits=2, axis="channel", group_size=32)       # KIVI's keys: per channel, 32 tokens per group
    """

    bits: int
    axis: Axis = "token"
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"Rounding.bits is {self.bits!r}; expected 2, 3, 4 or 8.")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"Rounding.axis is {self.axis!r}; expected 'token' (scales along head_dim) or "
                             "'channel' (scales along the sequence).")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"Rounding.group_size is {self.group_size!r}; expected None (the whole axis) or an "
                             "int >= 1.")

    def __call__(self, states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
                 requantize: bool) -> torch.Tensor:
        """(B, Hkv, T, D) -> the same, quantized and dequantized; positions, layer, is_key, requantize unused."""
        x = states.float()
        if self.axis == "token":
            group = states.shape[-1] if self.group_size is None else self.group_size
            if states.shape[-1] % group:
                raise ValueError(f"Rounding group_size {group} does not divide head_dim {states.shape[-1]}; "
                                 "declare head_dims that it divides, or another group_size.")
            grouped = x.reshape(*x.shape[:-1], -1, group)  # (B, Hkv, T, D/G, G)
            reduce = -1
        else:
            tokens = states.shape[-2]
            group = tokens if self.group_size is None else self.group_size
            if tokens % group:
                raise ValueError(f"Rounding(axis='channel') got {tokens} tokens, not a whole number of groups of "
                                 f"{group}; a per-channel round trip is applied to whole groups of tokens.")
            grouped = x.reshape(*x.shape[:-2], -1, group, x.shape[-1])  # (B, Hkv, T/G, G, D)
            reduce = -2
        return self._round(grouped, reduce).reshape(states.shape).to(states.dtype)

    def _round(self, grouped: torch.Tensor, dim: int) -> torch.Tensor:
        if self.symmetric:
            qmax = float(2 ** (self.bits - 1) - 1)
            scale = (grouped.abs().amax(dim, keepdim=True) / qmax).clamp(min=_TINY)
            return (grouped / scale).round().clamp(-qmax, qmax) * scale
        levels = float(2 ** self.bits - 1)
        low, high = grouped.amin(dim, keepdim=True), grouped.amax(dim, keepdim=True)
        step = ((high - low) / levels).clamp(min=_TINY)
        return ((grouped - low) / step).round().clamp(0, levels) * step + low

    def supports(self, head_dim: int) -> bool:
        """Whether the groups tile this head_dim (always, per channel)."""
        return self.axis == "channel" or self.group_size is None or head_dim % self.group_size == 0


@dataclass(frozen=True)
class KeysAndValues:
    """One round trip for keys and another for values, e.g. KIVI's keys per channel and values per token."""

    keys: RoundTrip
    values: RoundTrip

    def __call__(self, states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
                 requantize: bool) -> torch.Tensor:
        chosen = self.keys if is_key else self.values
        return chosen(states, positions=positions, layer=layer, is_key=is_key, requantize=requantize)

    def supports(self, head_dim: int) -> bool:
        return all(getattr(part, "supports", lambda _: True)(head_dim) for part in (self.keys, self.values))
