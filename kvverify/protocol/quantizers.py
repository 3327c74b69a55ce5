"""KV-cache quantizers, declared by a lossy cache so that the oracle can apply the same loss.

A lossy cache that declares ``CacheDeclaration(quantizer=Quantizer(...))`` is compared, in the
``cached_equals_uncached`` property, not with exact recomputation within a loose ``lossy_atol``, but with the
reference model run through :class:`kvverify.checks.replay.ReplayCache`: the recomputed keys and values passed
through the declared round trip at the moments, and on the tokens, that the declared scheme says the cache
applies it. Where the replay reproduces the cache's arithmetic, the comparison is bit for bit; otherwise within
``replay_atol``, measured for what the replay cannot reproduce.

A quantizer is two things:

- **what** happens to a chunk of states (``kind``): a built-in name (``"int8"``/``"int4"``/``"int2"``:
  asymmetric min/max groups of ``group_size`` elements along head_dim, per token and head; ``"fp8"``:
  float8_e4m3fn, one scale per tensor), or a :class:`RoundTrip`: any callable with the signature below, such as
  the built-in per-token / per-channel :class:`~kvverify.protocol.rounding.Rounding` or the cache's own function;
- **when** it happens (``scheme``), per layer, separately for keys and values:

  - ``"requantize"``: transformers' ``QuantizedLayer`` (quanto, HQQ). The first update is stored as
    ``round_trip(first, requantize=False)``; later tokens collect in a full-precision residual; when the
    residual and the new tokens reach ``residual_length``, everything the cache returns (dequantized stored
    tokens, residual, new) is passed through ``round_trip(..., requantize=True)`` and the residual emptied.
  - ``"append"``: each update's new tokens go through ``round_trip(new, requantize=False)`` once, on arrival,
    and are appended. With ``kind="fp8"`` the per-tensor scale is calibrated on the first update and frozen
    (transformers' ``Fp8QuantizedLayer``).
  - ``"kivi"`` (KIVI, Liu et al. 2024): new tokens join a full-precision residual. Keys: whenever the key
    residual holds ``residual_length`` tokens or more, its oldest whole multiple of ``residual_length`` tokens
    goes through one ``round_trip(oldest, is_key=True, requantize=False)`` (a per-channel round trip groups
    them along the sequence) and leaves the residual. Values: the newest ``residual_length`` values stay in
    full precision; older ones go through ``round_trip(older, is_key=False, requantize=False)`` in one call,
    as they leave.

  Every update returns the dequantized stored tokens followed by the residual, oldest first; the first update of
  a layer returns the states as given when ``prefill="given"`` (transformers, KIVI: the prefill attends to full
  precision), or what was stored, as every later update, when ``prefill="stored"``.

The :class:`RoundTrip` signature (also :data:`ROUND_TRIP_SIGNATURE`)::

    round_trip(states, *, positions, layer, is_key, requantize) -> dequantized states
        states:     (B, Hkv, T, D) tensor, the model's dtype and device
        positions:  (T,) LongTensor, the absolute position of each token (0 is the first token the cache saw)
        layer:      the layer index
        is_key:     True for keys, False for values
        requantize: False when every state is quantized for the first time (new tokens, a residual leaving
                    full precision); True when states already dequantized are quantized again (the
                    "requantize" scheme's flush)
        returns:    a tensor of the same shape, dtype and device: the states quantized and dequantized

It must be a pure function of its arguments (no state kept between calls): the replay and the cache each call it.

Standard quantizers: :data:`INT8_PER_TOKEN` (symmetric absmax/127 per token and head) and :func:`kivi`
(KIVI-2 and KIVI-4: asymmetric, keys per channel in groups of tokens, values per token, a full-precision residual).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, is_dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from kvverify.protocol.rounding import KeysAndValues, Rounding

Kind = Literal["int8", "int4", "int2", "fp8"]
Scheme = Literal["requantize", "append", "kivi"]
Prefill = Literal["given", "stored"]

_BITS = {"int8": 8, "int4": 4, "int2": 2}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)

#: The signature a cache's own round trip must accept, as the error messages spell it.
ROUND_TRIP_SIGNATURE = "(states, *, positions, layer, is_key, requantize) -> states"


@runtime_checkable
class RoundTrip(Protocol):
    """A cache's quantize-then-dequantize of a chunk of keys or values (see the module docstring)."""

    def __call__(self, states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
                 requantize: bool) -> torch.Tensor: ...


class QuantizerError(ValueError):
    """A declared quantizer cannot be used as declared; the message says what came, what was expected and what
    to do."""


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _check_signature(function: object) -> None:
    if not callable(function):
        raise QuantizerError(
            f"Quantizer.kind is {function!r} (a {type(function).__name__}); expected one of 'int8', 'int4', "
            f"'int2', 'fp8', or the cache's own round trip: a callable {ROUND_TRIP_SIGNATURE} "
            "(kvverify.protocol.quantizers.RoundTrip). Pass the function itself, not its result.")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: checked when called
        return
    try:
        signature.bind(torch.empty(0), positions=torch.empty(0), layer=0, is_key=True, requantize=False)
    except TypeError as error:
        raise QuantizerError(
            f"Quantizer.kind is {_name(function)}{signature}, which cannot be called as round_trip"
            f"{ROUND_TRIP_SIGNATURE} ({error}); give it the parameters states, positions, layer, is_key and "
            "requantize (positions onward may be keyword-only), e.g. "
            "def round_trip(states, *, positions, layer, is_key, requantize): ...") from None


@dataclass(frozen=True, repr=False)
class Quantizer:
    """What a lossy cache does to its keys and values, and when (see the module docstring).

    kind: a built-in name, or a :class:`RoundTrip` (the cache's own, or :class:`~kvverify.protocol.rounding.Rounding`).
    scheme: when the round trip is applied: "requantize", "append" or "kivi".
    group_size: built-in int kinds only: elements per scale along head_dim (must divide head_dim); fp8 and a
        RoundTrip: None (a round trip holds its own groups).
    residual_length: newest tokens kept in full precision ("requantize": the flush threshold; "kivi": keys are
        flushed that many at a time, and that many newest values stay in full precision).
    replay_atol: logit tolerance for what the replay cannot reproduce (0: the replay is exact, compare bitwise).
    prefill: what a layer's first update returns: "given" (the states as given) or "stored" (dequantized).

    >>> Quantizer(kind="fp8", scheme="append")                                  # transformers' fp8 cache
    >>> Quantizer(kind=Rounding(bits=8, symmetric=True), scheme="append")      # or INT8_PER_TOKEN
    >>> Quantizer(kind=my_round_trip, scheme="append", prefill="stored")       # the cache's own function
    """

    kind: Kind | RoundTrip
    scheme: Scheme = "requantize"
    group_size: int | None = None
    residual_length: int = 0
    replay_atol: float = 0.0
    prefill: Prefill = "given"

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):
            self._check_built_in()
        else:
            _check_signature(self.kind)
            if self.group_size is not None:
                raise QuantizerError(
                    f"Quantizer.group_size is {self.group_size!r} with a round trip of its own ({_name(self.kind)}); "
                    "expected None: the round trip decides its groups (e.g. Rounding(bits=4, group_size=32)).")
        if self.scheme not in ("requantize", "append", "kivi"):
            raise QuantizerError(f"Quantizer.scheme is {self.scheme!r}; expected 'requantize', 'append' or 'kivi'.")
        if isinstance(self.residual_length, bool) or not isinstance(self.residual_length, int) or (
                self.residual_length < (1 if self.scheme == "kivi" else 0)):
            least = 1 if self.scheme == "kivi" else 0
            raise QuantizerError(f"Quantizer.residual_length is {self.residual_length!r}; expected an int >= {least} "
                                 f"for scheme {self.scheme!r}.")
        if self.prefill not in ("given", "stored"):
            raise QuantizerError(f"Quantizer.prefill is {self.prefill!r}; expected 'given' (the first update is "
                                 "returned as given) or 'stored' (returned dequantized, as every later update).")

    def __repr__(self) -> str:
        """As a constructor call, a function kind by its dotted name (not its address), non-default fields only."""
        kind = self.kind
        shown = repr(kind) if isinstance(kind, str) or is_dataclass(kind) else (
            f"{getattr(kind, '__module__', '?')}.{_name(kind)}")
        rest = "".join(f", {f.name}={getattr(self, f.name)!r}" for f in fields(self)[1:]
                       if getattr(self, f.name) != f.default)
        return f"Quantizer(kind={shown}{rest})"

    def _check_built_in(self) -> None:
        if self.kind not in (*_BITS, "fp8"):
            raise QuantizerError(f"Quantizer.kind is {self.kind!r}; expected one of int8, int4, int2, fp8, or a "
                                 f"round trip {ROUND_TRIP_SIGNATURE}.")
        if self.kind == "fp8" and self.group_size is not None:
            raise QuantizerError("Quantizer(kind='fp8') quantizes per tensor; leave group_size at None.")
        if self.kind != "fp8" and (self.group_size is None or self.group_size < 1):
            raise QuantizerError(f"Quantizer(kind={self.kind!r}) needs group_size >= 1 (elements per scale along "
                                 f"head_dim); got {self.group_size!r}.")
        if self.scheme == "append" and self.kind != "fp8":
            raise QuantizerError(f"Quantizer.scheme is 'append' with kind {self.kind!r}; expected 'requantize', or "
                                 "'append' with fp8 (for int8 per token on arrival use INT8_PER_TOKEN or "
                                 "kind=Rounding(...)).")
        if self.scheme == "kivi":
            raise QuantizerError(f"Quantizer.scheme is 'kivi' with kind {self.kind!r}; expected a round trip per "
                                 "axis (keys per channel, values per token): use kivi(bits, ...) or "
                                 "kind=KeysAndValues(Rounding(...), Rounding(...)).")

    def supports(self, head_dim: int) -> bool:
        """Whether the groups tile this head_dim (a round trip without a ``supports`` method: assumed to)."""
        if not isinstance(self.kind, str):
            supports = getattr(self.kind, "supports", None)
            return bool(supports(head_dim)) if callable(supports) else True
        return self.group_size is None or head_dim % self.group_size == 0

    def scale_of(self, states: torch.Tensor) -> torch.Tensor:
        """fp8: the per-tensor scale calibrated on ``states``, a float32 scalar."""
        scale: torch.Tensor = (states.abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        return scale

    def round_trip(self, states: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Built-in kinds: quantize and dequantize ``states`` (B, Hkv, S, D); same shape and dtype. fp8 uses
        ``scale`` (calibrated on ``states`` when None). A RoundTrip kind is called through :meth:`apply`."""
        if not isinstance(self.kind, str):
            raise QuantizerError(f"Quantizer.round_trip is for the built-in kinds; this one's kind is "
                                 f"{_name(self.kind)}: call Quantizer.apply(states, positions=, layer=, is_key=, "
                                 "requantize=).")
        if self.kind == "fp8":
            scale = self.scale_of(states) if scale is None else scale
            return ((states.float() / scale).to(FP8).float() * scale).to(states.dtype)
        assert self.group_size is not None
        if not self.supports(states.shape[-1]):
            raise QuantizerError(f"group_size {self.group_size} does not divide head_dim {states.shape[-1]}")
        return Rounding(bits=_BITS[self.kind], axis="token", group_size=self.group_size)(
            states, positions=torch.empty(0), layer=0, is_key=True, requantize=False)

    def apply(self, states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool, requantize: bool,
              scale: torch.Tensor | None = None) -> torch.Tensor:
        """The round trip of ``states`` (B, Hkv, T, D) at ``positions`` (T,), checked: a RoundTrip's result must
        have the states' shape, dtype and device (else :class:`QuantizerError` says what came)."""
        if isinstance(self.kind, str):
            return self.round_trip(states, scale)
        result = self.kind(states, positions=positions, layer=layer, is_key=is_key, requantize=requantize)
        what = f"{'keys' if is_key else 'values'} of layer {layer}, positions {positions[0]}..{positions[-1]}"
        if not isinstance(result, torch.Tensor):
            raise QuantizerError(
                f"the declared round trip {_name(self.kind)} returned {type(result).__name__} for the {what}; "
                f"expected a tensor: the states quantized and dequantized, shape {tuple(states.shape)}, dtype "
                f"{states.dtype}. Return the dequantized states (not codes, scales or a tuple).")
        if result.shape != states.shape or result.dtype != states.dtype or result.device != states.device:
            raise QuantizerError(
                f"the declared round trip {_name(self.kind)} returned shape {tuple(result.shape)}, dtype "
                f"{result.dtype}, device {result.device} for the {what}; expected what it was given: shape "
                f"{tuple(states.shape)} (B, Hkv, T, D), dtype {states.dtype}, device {states.device}. Return the "
                "states quantized and dequantized, cast back to their dtype (e.g. .to(states.dtype)).")
        return result


#: Symmetric int8 with one absmax/127 scale per token and head, applied to each token once, on arrival; every
#: update returns what is stored (the prefill too). Reference cache: :class:`kvverify.caches.Int8PerTokenCache`.
INT8_PER_TOKEN = Quantizer(kind=Rounding(bits=8, axis="token", symmetric=True), scheme="append", prefill="stored")


def kivi(bits: int, *, group_size: int = 32, residual_length: int = 128) -> Quantizer:
    """KIVI (Liu et al. 2024) at ``bits`` (2 for KIVI-2, 4 for KIVI-4): asymmetric; keys per channel in groups of
    ``group_size`` tokens along the sequence, values per token (one scale over head_dim); the newest keys (fewer
    than ``residual_length``) and the newest ``residual_length`` values in full precision; the prefill attends
    to full precision (``prefill="given"``). The defaults are the paper's (G=32, R=128); ``residual_length``
    must be a multiple of ``group_size``. Reference cache: :class:`kvverify.caches.KiviCache`.

    >>> kivi(2, group_size=4, residual_length=8)
    """
    if group_size < 1 or residual_length < 1 or residual_length % group_size:
        raise QuantizerError(f"kivi(group_size={group_size}, residual_length={residual_length}): expected "
                             "residual_length a positive multiple of group_size (keys are flushed "
                             "residual_length tokens at a time, in groups of group_size).")
    return Quantizer(kind=KeysAndValues(keys=Rounding(bits=bits, axis="channel", group_size=group_size),
                                        values=Rounding(bits=bits, axis="token")),
                     scheme="kivi", residual_length=residual_length)


#: KIVI-2 and KIVI-4 with the paper's groups (32 tokens) and residual (128 tokens).
KIVI_2 = kivi(2)
KIVI_4 = kivi(4)
