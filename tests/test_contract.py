"""The contract, checked after every update by CheckedCache: each broken rule raises ContractViolation with
a message naming the rule; correct caches pass untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvverify import ModelConfig, ReferenceModel
from kvverify.caches import ContiguousCache, SlidingWindowCache, StaticCache
from kvverify.checks.contract import CheckedCache, ContractViolation
from kvverify.mutants import MUTANTS
from kvverify.protocol.cache import capabilities

TESTS = Path(__file__).parent
CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def generate(cache: Any, config: ModelConfig = CONFIG, prompt_len: int = 3, new: int = 8) -> None:
    model = ReferenceModel(config, seed=0)
    prompt = torch.arange(prompt_len).remainder(config.vocab_size)[None].repeat(2, 1)
    model.generate(prompt, new, cache=CheckedCache(cache, config))


@pytest.mark.parametrize("cache", [ContiguousCache(), StaticCache.from_config(CONFIG)], ids=["contiguous", "static"])
def test_correct_caches_keep_the_contract(cache: Any) -> None:
    generate(cache)


def test_a_sliding_window_may_return_fewer_slots_than_tokens() -> None:
    config = CONFIG.replace(sliding_window=4)
    generate(SlidingWindowCache.from_config(config), config, prompt_len=6, new=6)


def test_transformers_dynamic_cache_keeps_the_contract() -> None:
    transformers = pytest.importorskip("transformers")
    generate(transformers.DynamicCache())


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("wrong_arity", "update() returned a tuple of 3; expected a tuple (keys, values) of two tensors"),
        ("repeats_heads", "returned keys of shape (2, 4, 3, 4); expected (batch=2, n_kv_heads=2, seq, head_dim=4) "
                          "(grouped-query heads repeated before caching?)"),
        ("float16", "returned keys of dtype torch.float16; expected the model's torch.float32"),
        ("meta_device", "returned keys on device meta; expected the model's cpu"),
        ("nans", "returned NaN or infinite values in the 4 slots holding tokens"),
        ("raises_midway", "layer 0 (a 1-token update): update() raised IndexError: block table full, at "),
        ("modifies_input", "update() modified the key_states or value_states passed to it"),
        ("counts_wrong", "get_seq_length(0) returned 6; expected 5, the tokens written to layer 0"),
    ],
)
def test_each_broken_rule_is_named(factory: str, expected: str) -> None:
    from targets import buggy

    with pytest.raises(ContractViolation) as error:
        generate(getattr(buggy, factory)(CONFIG))
    assert expected in str(error.value)
    assert isinstance(error.value, AssertionError)  # Hypothesis shrinks it like any failed property


def test_the_gqa_repeated_before_cache_mutant_is_killed_by_the_shape_check() -> None:
    mutant = MUTANTS["gqa_repeated_before_cache"]
    with pytest.raises(ContractViolation, match=r"n_kv_heads=2.*repeated before caching"):
        generate(mutant.factory(CONFIG))


def test_too_few_slots_without_a_window_is_named() -> None:
    class KeepsFour(ContiguousCache):
        def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kw: Any = None) -> Any:
            keys, values = super().update(k, v, layer_idx, kw)
            return keys[:, :, -4:], values[:, :, -4:]

    with pytest.raises(ContractViolation, match="returned 4 slots but 5 tokens were written and the model has no"):
        generate(KeepsFour())
    config = CONFIG.replace(sliding_window=6)
    with pytest.raises(ContractViolation, match="with a sliding window of 6 and 1 new tokens the queries need the "
                                                "newest 5 of the 5 tokens written"):
        generate(KeepsFour(), config, prompt_len=3, new=8)


def test_optional_methods_are_offered_only_when_the_inner_cache_has_them() -> None:
    class Bare:
        def update(self, *args: Any) -> Any:
            raise AssertionError

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0

    assert capabilities(CheckedCache(Bare(), CONFIG)) == frozenset()  # type: ignore[arg-type]
    assert capabilities(CheckedCache(ContiguousCache(), CONFIG)) == {"crop", "reorder_cache", "reset"}
    with pytest.raises(AttributeError):
        CheckedCache(Bare(), CONFIG).crop  # type: ignore[arg-type]  # noqa: B018


def test_the_token_count_follows_crop_reorder_and_reset() -> None:
    cache = CheckedCache(ContiguousCache(), CONFIG)
    kv = torch.zeros(2, 2, 5, 4)
    for layer in range(2):
        cache.update(kv, kv, layer)
    cache.crop(-2)
    assert cache.get_seq_length(1) == 3
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.reset()
    assert cache.get_seq_length() == 0
    for layer in range(2):
        cache.update(kv[:, :, :1], kv[:, :, :1], layer)  # no violation: the count restarted at 0


def test_a_crop_that_leaves_a_layer_long_is_named() -> None:
    from targets import buggy

    cache = CheckedCache(buggy.crop_keeps_length(CONFIG), CONFIG)
    kv = torch.zeros(1, 2, 5, 4)
    for layer in range(2):
        cache.update(kv, kv, layer)
    with pytest.raises(ContractViolation, match=r"after crop\(3\): get_seq_length\(0\) returned 5; expected 3"):
        cache.crop(3)


class _NanAt(ContiguousCache):
    """Puts a NaN into layer 0's key slot ``slot`` once ``when`` tokens are written (a fault in an old slot)."""

    def __init__(self, slot: int, when: int) -> None:
        super().__init__()
        self.slot, self.when = slot, when

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kw: Any = None) -> Any:
        keys, values = super().update(k, v, layer_idx, kw)
        if layer_idx == 0 and keys.shape[2] >= self.when:
            keys = keys.clone()
            keys[:, :, self.slot] = float("nan")
        return keys, values


def _updates_until_violation(cache: Any, config: ModelConfig, tokens: int) -> int:
    checked = CheckedCache(cache, config)
    k = torch.ones(1, config.n_kv_heads, 1, config.head_dim)
    for step in range(tokens):
        try:
            for layer in range(config.n_layers):
                checked.update(k, k, layer)
        except ContractViolation as error:
            assert "NaN or infinite values" in str(error)
            return step + 1
    raise AssertionError(f"no violation in {tokens} updates")


@pytest.mark.parametrize(("slot", "when", "found_at"), [
    (3, 10, 10),  # within WHOLE_CHECK_TOKENS: every slot, every update
    (299, 300, 300),  # a new token's slot: at once
    (5, 300, 512),  # an old slot past WHOLE_CHECK_TOKENS: at the next multiple of it
])
def test_non_finite_slots_are_found_on_the_schedule(slot: int, when: int, found_at: int) -> None:
    from kvverify.checks.contract import WHOLE_CHECK_TOKENS

    config = CONFIG.replace(max_seq_len=600, n_layers=1)
    assert WHOLE_CHECK_TOKENS == 256
    assert _updates_until_violation(_NanAt(slot, when), config, 600) == found_at
