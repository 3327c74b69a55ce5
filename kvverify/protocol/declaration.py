"""The rules of each :class:`~kvverify.protocol.CacheDeclaration` field: one row per field, checked when a
declaration is built and again when the suite reads it, so a wrong value is one clear paragraph naming the
field, what came and what is expected, before anything runs.

A new field adds one row to :data:`RULES` (``tests/test_declarations.py`` checks every field has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from kvverify.protocol.config import DTYPES, device_name
from kvverify.protocol.eviction import Eviction
from kvverify.protocol.quantizers import Quantizer


class DeclarationError(ValueError):
    """A ``CacheDeclaration`` field (or a ``kvverify_declaration`` attribute) holds a value it cannot; the
    message names the field, what came and what is expected."""


class _Bad(Exception):
    """Raised by a rule's normaliser: the value breaks the rule (``args[0]``: the entry of a tuple that does)."""


@dataclass(frozen=True)
class Rule:
    """expected: what the field holds, as the messages spell it; normalise: the value in its stored form
    (a lone value becomes a one-element tuple for tuple fields), or raises ``_Bad``. None always passes."""

    expected: str
    normalise: Callable[[Any], Any]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not _is_int(value) or value < low:
            raise _Bad
        return int(value)
    return check


def _non_negative_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Bad
    return float(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices or not isinstance(value, str):
            raise _Bad
        return str(value)
    return check


def _instance_of(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, kind):
            raise _Bad
        return value

    return check


def _tuple_of(item: Callable[[Any], Any], lone: type | tuple[type, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A non-empty tuple (or list) of items, each normalised; a lone item of type ``lone`` becomes ``(item,)``."""
    def check(value: Any) -> tuple[Any, ...]:
        items = (value,) if isinstance(value, lone) else value
        if not isinstance(items, (tuple, list)):
            raise _Bad
        if not items:
            raise _Bad("is empty")
        normalised = []
        for entry in items:
            try:
                normalised.append(item(entry))
            except (_Bad, TypeError, ValueError):
                raise _Bad(f"holds {_shown(entry)}") from None
        return tuple(dict.fromkeys(normalised))  # duplicates dropped, order kept
    return check


def _device(value: Any) -> str:
    name = device_name(value)
    if name is None:
        raise _Bad
    return name


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name in DTYPES:
        return DTYPES[name]
    raise _Bad


_POSITIVE_INTS = "a non-empty tuple of ints >= 1"

#: Each field's rule. None (the default of every field) means "not declared: try everything".
RULES: Mapping[str, Rule] = MappingProxyType({
    "lossy_atol": Rule("None or a finite number >= 0 (the absolute logit tolerance), e.g. 0.05", _non_negative_float),
    "sliding_window": Rule("None or an int >= 1 (the window the cache implements)", _int_at_least(1)),
    "max_batch_size": Rule("None or an int >= 1 (the largest batch the cache takes)", _int_at_least(1)),
    "max_seq_len": Rule("None or an int >= 2 (the most tokens the cache holds)", _int_at_least(2)),
    "crop_argument": Rule("None, 'keep' or 'remove' (what crop(n) means)", _one_of("keep", "remove")),
    "devices": Rule("None or a non-empty tuple of torch device names, e.g. ('cuda',) or ('cpu', 'cuda:1')",
                    _tuple_of(_device, (str, torch.device))),
    "head_dims": Rule(f"None or {_POSITIVE_INTS}, e.g. (64, 128)", _tuple_of(_int_at_least(1), int)),
    "dtypes": Rule(f"None or a non-empty tuple of torch dtypes among {', '.join(DTYPES)}, e.g. (torch.bfloat16,)",
                   _tuple_of(_dtype, (str, torch.dtype))),
    "batch_sizes": Rule(f"None or {_POSITIVE_INTS} (the exact batch sizes taken), e.g. (1,) or (4,)",
                        _tuple_of(_int_at_least(1), int)),
    "block_size": Rule("None or an int >= 1 (the page size: lengths are drawn around its multiples)",
                       _int_at_least(1)),
    "positional": Rule("None or 'rope' (the cache applies RoPE to the keys itself)", _one_of("rope")),
    "quantizer": Rule("None or a kvverify.protocol.quantizers.Quantizer, e.g. Quantizer(kind='int8', group_size=32), "
                      "kivi(2), INT8_PER_TOKEN or Quantizer(kind=your_round_trip, scheme='append')",
                      _instance_of(Quantizer)),
    "compile": Rule("True or False (whether the compiled property checks the cache)", _instance_of(bool)),
    "keeps": Rule("None or a kvverify.protocol.eviction.Eviction (the cache keeps a subset of its tokens), e.g. "
                  "Eviction('smallest_key_norm', 0.5) or Eviction('sinks_window', 0.5, n_sink=4)",
                  _instance_of(Eviction)),
})


def normalised(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every field's value checked against its rule (fields without a rule pass unchanged) and the fields
    checked against each other; raises :class:`DeclarationError` naming the first wrong field."""
    result = dict(values)
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is None or value is None:
            continue
        try:
            result[name] = rule.normalise(value)
        except (_Bad, TypeError, ValueError) as bad:
            what = f"is {_shown(value)}" if not (isinstance(bad, _Bad) and bad.args) else f"{bad.args[0]}"
            raise DeclarationError(f"CacheDeclaration.{name} {what}; expected {rule.expected}.") from None
    sizes, most = result.get("batch_sizes"), result.get("max_batch_size")
    if sizes is not None and most is not None and max(sizes) > most:
        raise DeclarationError(
            f"CacheDeclaration.batch_sizes is {sizes!r}, larger than max_batch_size={most}; expected batch sizes "
            "up to max_batch_size (or leave max_batch_size at None: batch_sizes alone bounds the batch)."
        )
    window, longest = result.get("sliding_window"), result.get("max_seq_len")
    if window is not None and longest is not None and window > longest:
        raise DeclarationError(
            f"CacheDeclaration.sliding_window is {window}, longer than max_seq_len={longest}; expected a window "
            "of at most max_seq_len tokens."
        )
    return result


def _shown(value: object) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} (a {type(value).__name__})"


def refuse_attribute(owner: object, value: object) -> DeclarationError:
    """The error for a ``kvverify_declaration`` attribute that is not a ``CacheDeclaration``."""
    hint = (f"kvverify.CacheDeclaration(**{_shown(value).split(' (a ')[0]})" if isinstance(value, dict)
            else "kvverify.CacheDeclaration(...)")
    return DeclarationError(
        f"kvverify_declaration on {type(owner).__name__} {getattr(owner, '__qualname__', '')} is "
        f"{_shown(value)}; expected a kvverify.CacheDeclaration. Write kvverify_declaration = {hint}."
    )
