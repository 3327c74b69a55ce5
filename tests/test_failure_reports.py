"""Failure reports name what the wrong tensor is (keys and values swapped) and the last operation that changed
the cache, not the last one run."""

from __future__ import annotations

from typing import Any

import torch

from kvverify import ModelConfig, ReferenceModel
from kvverify.caches import ContiguousCache
from kvverify.checks import PROPERTIES, make_target
from kvverify.checks.case import Case
from kvverify.checks.locate import locate
from kvverify.checks.properties.session import Session
from kvverify.mutants import MUTANTS

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


class SwapsKeysAndValues(ContiguousCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return values, keys


def test_a_key_value_swap_is_named() -> None:
    case = Case(CONFIG, ((1, 2, 3),), (0,), 4)
    target = make_target(lambda config: SwapsKeysAndValues(), "swap")
    message = locate(PROPERTIES["cached_equals_uncached"].check, target, case, time_limit=30)
    assert "cached key equals the recomputed value: keys and values swapped" in message, message


def test_keys_returned_as_values_are_named() -> None:
    case = Case(CONFIG, ((1, 2, 3),), (0,), 4)
    target = make_target(MUTANTS["keys_as_values"].factory, "keys_as_values")
    message = locate(PROPERTIES["cached_equals_uncached"].check, target, case, time_limit=30)
    assert "cached value equals the recomputed key" in message, message


def test_a_session_swap_is_named_in_the_contents_check() -> None:
    session = Session(make_target(lambda config: SwapsKeysAndValues(), "swap"), ReferenceModel(CONFIG), 1)
    try:
        session.append(torch.tensor([[1, 2, 3]]))
    except AssertionError as error:
        assert "keys and values swapped" in str(error), str(error)
    else:
        raise AssertionError("a cache returning values as keys passed the session's contents check")


def test_an_identity_reorder_is_not_taken_for_the_last_change() -> None:
    session = Session(make_target(ContiguousCache.from_config, "contiguous"), ReferenceModel(CONFIG), 2)
    session.append(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    session.reorder([0, 1])
    session.crop(10)  # keeps every token
    assert session.last_change == "append 3 tokens at 0"
    assert session._history().startswith("last operation that changed the cache: append 3 tokens at 0; operations")
    session.reorder([1, 1])
    assert session.last_change == "reorder_cache([1, 1])"
