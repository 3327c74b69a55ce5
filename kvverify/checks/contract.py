"""The protocol's contract, checked on every call: a wrapper around the cache under test.

:class:`CheckedCache` forwards each call to the cache and, after every ``update``, checks what came back:

- a pair of tensors ``(batch, n_kv_heads, S, head_dim)`` with ``S`` per the protocol's rule against the
  ``N`` tokens written (``S >= N``; or, with a sliding window, ``min(N, W - 1 + T)`` newest tokens at least);
- the model's dtype and device, finite values where the inputs were finite;
- the tensors passed in were not modified;
- once a forward has written every layer, ``get_seq_length(layer)`` equals the tokens written, for each layer.

It keeps its own count of tokens written per layer through ``crop``, ``reorder_cache`` and ``reset``, and
offers those only when the wrapped cache has them, so capability detection sees the same cache.
A broken rule raises :class:`ContractViolation`, an ``AssertionError``, so Hypothesis shrinks it like any
failed property.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from kvverify.checks.cropping import crop_convention, tokens_kept
from kvverify.checks.loading import raised_at
from kvverify.protocol.cache import OPTIONAL_METHODS, KVCache, kv_mismatch, written_slots
from kvverify.protocol.config import ModelConfig


class ContractViolation(AssertionError):
    """The cache broke the protocol (see :class:`kvverify.KVCache`); the message says which rule, where and
    what came."""


class UpdateObserver(Protocol):
    """Told about every call that reaches the cache (see :mod:`kvverify.checks.locate`)."""

    def updated(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, written: int) -> None: ...

    def cropped(self, kept: int) -> None: ...

    def reordered(self, beam_idx: torch.Tensor) -> None: ...

    def was_reset(self) -> None: ...


class CheckedCache:
    """``inner`` checked against the contract for a model of ``config``; an ``observer`` sees every call."""

    def __init__(self, inner: KVCache, config: ModelConfig, observer: UpdateObserver | None = None, *,
                 keeps_subset: bool = False) -> None:
        self.inner = inner
        self.keeps_subset = keeps_subset  # declared keeps=...: fewer slots than tokens, checked by the oracle
        self.config = config
        self.observer = observer
        self._written = [0] * config.n_layers
        self._inputs_finite = True
        self._forwards = 0

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys_in, values_in = key_states.clone(), value_states.clone()
        count = key_states.shape[-2]
        self._inputs_finite = self._inputs_finite and _finite(keys_in) and _finite(values_in)
        where = f"step {self._forwards}, layer {layer_idx} (a {count}-token update)"
        try:
            result = self.inner.update(key_states, value_states, layer_idx, cache_kwargs)
        except Exception as error:
            raise ContractViolation(
                f"{where}: update() raised {type(error).__name__}: {error}{raised_at(error)}. Expected it to store "
                f"the new tokens and return (keys, values); {self._written[layer_idx]} tokens were written to "
                "this layer before."
            ) from error
        self._written[layer_idx] += count
        keys, values = self._check_result(result, where, key_states.shape[0], count, self._written[layer_idx])
        if not (torch.equal(keys_in, key_states) and torch.equal(values_in, value_states)):
            raise ContractViolation(
                f"{where}: update() modified the key_states or value_states passed to it. Expected them "
                "untouched (the model may still use them); copy before changing them in place."
            )
        if self.observer is not None:
            self.observer.updated(layer_idx, keys_in, values_in, keys, values, self._written[layer_idx])
        if layer_idx == self.config.n_layers - 1:
            self._forwards += 1
            self._check_lengths(f"after step {self._forwards - 1} (every layer written)")
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.get_seq_length(layer_idx))

    def __getattr__(self, name: str) -> Any:
        """The optional methods the inner cache has (checked); other public attributes of the inner cache."""
        if name.startswith("_") or name in ("inner", "config", "observer", "keeps_subset"):
            raise AttributeError(name)
        if name in OPTIONAL_METHODS:
            if not callable(getattr(self.inner, name, None)):
                raise AttributeError(f"{type(self.inner).__name__} has no {name}()")
            return getattr(self, f"_checked_{name}")
        return getattr(self.inner, name)

    def _checked_crop(self, argument: int) -> None:
        convention = crop_convention(self.inner)
        self.inner.crop(argument)  # type: ignore[attr-defined]  # present: see __getattr__
        self._written = [tokens_kept(convention, argument, n) for n in self._written]
        if self.observer is not None:
            self.observer.cropped(self._written[0])
        self._check_lengths(f"after crop({argument})")

    def _checked_reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.inner.reorder_cache(beam_idx)  # type: ignore[attr-defined]
        if self.observer is not None:
            self.observer.reordered(beam_idx)
        self._check_lengths("after reorder_cache()")

    def _checked_reset(self) -> None:
        self.inner.reset()  # type: ignore[attr-defined]
        self._written = [0] * self.config.n_layers
        self._inputs_finite = True
        if self.observer is not None:
            self.observer.was_reset()
        self._check_lengths("after reset()")

    def _check_result(
        self, result: object, where: str, batch: int, count: int, written: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(result, (tuple, list)) and len(result) == 2
                and all(isinstance(t, torch.Tensor) for t in result)):
            came = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) else (
                f"a {type(result).__name__}")
            raise ContractViolation(
                f"{where}: update() returned {came}; expected a tuple (keys, values) of two tensors."
            )
        keys, values = result
        c = self.config
        for name, tensor in (("keys", keys), ("values", values)):
            wrong = kv_mismatch(c, tensor, batch=batch)
            if wrong is None:
                continue
            if wrong.kind == "shape":
                shape = tuple(tensor.shape)
                raise ContractViolation(
                    f"{where}: update() returned {name} of shape {wrong.got}; expected {wrong.expected}"
                    + (" (grouped-query heads repeated before caching?)" if len(shape) == 4
                       and shape[1] == c.n_heads != c.n_kv_heads else "") + "."
                )
            held = f"of dtype {wrong.got}" if wrong.kind == "dtype" else f"on device {wrong.got}"
            raise ContractViolation(f"{where}: update() returned {name} {held}; expected the model's {wrong.expected}.")
        if keys.shape[2] != values.shape[2]:
            raise ContractViolation(
                f"{where}: update() returned {keys.shape[2]} key slots but {values.shape[2]} value slots; "
                "expected the same number."
            )
        self._check_slots(keys.shape[2], where, count, written)
        held_keys, held_values = written_slots(keys, values, written)
        if self._inputs_finite and not _held_finite(held_keys, held_values, count, written, self.keeps_subset):
            raise ContractViolation(
                f"{where}: update() returned NaN or infinite values in the {held_keys.shape[2]} slots holding "
                "tokens, although every key and value written was finite."
            )
        return keys, values

    def _check_slots(self, slots: int, where: str, count: int, written: int) -> None:
        """``S >= N``, or a window's newest ``min(N, W - 1 + T)`` tokens at least."""
        if slots >= written:
            return
        if self.keeps_subset:  # which tokens it kept is the eviction oracle's to judge (kvverify.checks.eviction)
            if slots < count:
                raise ContractViolation(f"{where}: update() returned {slots} slots for {count} new tokens; a cache "
                                        "that keeps a subset returns what it kept and every new token.")
            return
        window = self.config.sliding_window
        if window is None:
            raise ContractViolation(
                f"{where}: update() returned {slots} slots but {written} tokens were written and the model has no "
                f"sliding window; expected at least {written} (slot i holding token i)."
            )
        needed = min(written, window - 1 + count)
        if slots < needed:
            raise ContractViolation(
                f"{where}: update() returned {slots} slots; with a sliding window of {window} and {count} new "
                f"tokens the queries need the newest {needed} of the {written} tokens written."
            )

    def _check_lengths(self, when: str) -> None:
        for layer, expected in enumerate(self._written):
            try:
                reported = self.inner.get_seq_length(layer)
            except Exception as error:
                raise ContractViolation(
                    f"{when}: get_seq_length({layer}) raised {type(error).__name__}: {error}{raised_at(error)}; "
                    f"expected {expected}, the tokens written to layer {layer}."
                ) from error
            if not _int_like(reported) or int(reported) != expected:
                raise ContractViolation(
                    f"{when}: get_seq_length({layer}) returned {reported!r}; expected {expected}, the tokens "
                    f"written to layer {layer} (for a sliding window: tokens seen, not tokens kept)."
                )


#: Up to this many tokens written, every update checks every held slot for NaN and infinity; past it, the slots of
#: the new tokens on every update and every held slot whenever the tokens written cross a multiple of it. A value
#: that turns non-finite in between shows in the logits, which the properties compare; checking every slot on
#: every update cost O(N²) over a generation of N tokens, 4 of the 24 s of a 4,096-token one.
WHOLE_CHECK_TOKENS = 256


def _held_finite(keys: torch.Tensor, values: torch.Tensor, count: int, written: int, keeps_subset: bool) -> bool:
    """Whether the held slots (B, Hkv, S', D) that this update's check covers are finite (see
    :data:`WHOLE_CHECK_TOKENS`); the new tokens are the newest slots, except in a cache that keeps a subset."""
    whole = keeps_subset or written <= WHOLE_CHECK_TOKENS or (
        written // WHOLE_CHECK_TOKENS != (written - count) // WHOLE_CHECK_TOKENS)
    if not whole:
        keys, values = keys[:, :, -count:], values[:, :, -count:]
    return _finite(keys) and _finite(values)


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity, in one pass without a bool tensor of every element (aminmax carries a NaN to both
    ends): checked after every update over every written slot, it was most of a long generation's time."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _int_like(value: object) -> bool:
    """An int, or a 0-d integer tensor (what transformers' static caches return)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.dtype.is_floating_point
    return isinstance(value, int) and not isinstance(value, bool)
