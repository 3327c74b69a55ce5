"""Localisation: a failure says at which step, layer, head and position the cache first returned keys or values
that differ from the ones recomputed from the same inputs, and by how much."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvverify import ModelConfig
from kvverify.caches import BUILTIN_CACHES
from kvverify.checks import PROPERTIES, make_target
from kvverify.checks.case import Case
from kvverify.checks.locate import locate
from kvverify.checks.target import Target

TESTS = Path(__file__).parent
PROPERTY = PROPERTIES["cached_equals_uncached"]


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32)


def case(prompt_len: int, new: int, config: ModelConfig = CONFIG) -> Case:
    row = tuple(i % config.vocab_size for i in range(prompt_len))
    return Case(config=config, prompt=(row, row), pad=(0, 1), max_new_tokens=new)


def test_a_stale_value_is_located_to_its_layer_head_and_position() -> None:
    from targets import buggy

    message = locate(PROPERTY.check, make_target(buggy.stale_value, "stale"), case(3, 6), time_limit=30)
    assert message.startswith("where (first difference): layer 1, head 1, position 5: cached value differs from "
                              "recomputed value, max abs 1 (step 3, a 1-token update bringing the layer to 6 tokens")


def test_a_dropped_key_is_located_at_position_zero() -> None:
    from targets import buggy

    message = locate(PROPERTY.check, make_target(buggy.drops_oldest, "drops"), case(9, 2), time_limit=30)
    assert "layer 0, head 1, position 0: cached key differs from recomputed key, max abs" in message
    assert "(step 0, a 9-token update bringing the layer to 9 tokens" in message


def test_a_correct_sliding_cache_shows_no_difference() -> None:
    target = make_target(BUILTIN_CACHES["sliding"], "sliding")
    windowed = case(5, 8, CONFIG.replace(sliding_window=3))

    def always_fails(t: Target, c: object) -> None:
        PROPERTY.check(t, c)
        raise AssertionError("planted")

    assert "equal the ones recomputed" in locate(always_fails, target, windowed, time_limit=30)


def test_a_failure_that_does_not_recur_is_said_to_depend_on_earlier_examples() -> None:
    target = make_target(BUILTIN_CACHES["contiguous"], "contiguous")
    message = locate(PROPERTY.check, target, case(4, 4), time_limit=30)
    assert "passes when run again on its own" in message
