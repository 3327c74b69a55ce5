"""The eviction oracle (kvverify.checks.eviction) on kvverify's own compressing cache (StreamingLLM's sinks and
window, kvverify.caches.sinks_window) and its mutants: the correct cache passes bit for bit, a cache that keeps
the right tokens at shifted positions, one that keeps one token too few and one that counts kept tokens as its
length are each killed, with a message naming what went wrong; a second call from the compressed cache is held
to the same."""

from __future__ import annotations

import pytest
import torch

from kvverify.caches.sinks_window import SinksWindowCache, sinks_window_cache
from kvverify.checks.case import Case
from kvverify.checks.eviction import EvictionMismatch, check_evicted
from kvverify.checks.properties import PROPERTIES
from kvverify.checks.target import make_target
from kvverify.mutants import eviction as mutants
from kvverify.protocol import CacheDeclaration, DeclarationError, Eviction, EvictionError, ModelConfig
from kvverify.reference.eviction import key_norm_violations, sinks_and_window
from kvverify.runs import CacheCheckFailed, check_cache

DECLARED = sinks_window_cache.kvverify_declaration.keeps  # type: ignore[attr-defined]


def _case(positional: str = "rope", prompt: int = 11, new: int = 4, batch: int = 2, kv_heads: int = 2) -> Case:
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2 * kv_heads, n_kv_heads=kv_heads,
                         head_dim=4, max_seq_len=32, max_batch_size=batch, positional=positional,
                         dtype=torch.float32)
    rows = torch.randint(0, 32, (batch, prompt), generator=torch.Generator().manual_seed(1)).tolist()
    return Case(config, tuple(tuple(r) for r in rows), (0,) * batch, new)


def test_eviction_is_validated_with_a_clear_error() -> None:
    with pytest.raises(EvictionError, match=r"compression_ratio is 1; expected a number in \[0, 1\)"):
        Eviction("smallest_key_norm", 1)
    with pytest.raises(EvictionError, match="expected one of 'sinks_window'"):
        Eviction("h2o", 0.5)  # type: ignore[arg-type]
    with pytest.raises(EvictionError, match="sinks belong to rule 'sinks_window' only"):
        Eviction("count", 0.5, n_sink=4)
    with pytest.raises(DeclarationError, match=r"CacheDeclaration.keeps is 'subset' \(a str\); expected None or a "
                                               r"kvverify.protocol.eviction.Eviction"):
        CacheDeclaration(keeps="subset")  # type: ignore[arg-type]


def test_the_kept_count_is_kvpress_rule() -> None:
    rule = Eviction("smallest_key_norm", 0.5)
    assert [rule.n_kept(n) for n in (1, 2, 5, 12, 13)] == [1, 1, 2, 6, 6]
    assert Eviction("count", 0.0).n_kept(7) == 7
    assert sinks_and_window(Eviction("sinks_window", 0.5, n_sink=2), 11).tolist() == [0, 1, 8, 9, 10]
    assert sinks_and_window(Eviction("sinks_window", 0.5, n_sink=4), 5).tolist() == [0, 1]  # fewer kept than sinks


def test_key_norm_rule_names_the_kept_key_that_should_have_gone() -> None:
    keys = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])[None, None]  # (1, 1, 4, 2)
    assert key_norm_violations(keys, torch.tensor([[[1, 3]]])) == []
    (broken,) = key_norm_violations(keys, torch.tensor([[[0, 3]]]))
    assert "kept slot 0 (key norm 3)" in broken and "evicted slot 1 (key norm 1)" in broken


@pytest.mark.parametrize("positional", ["rope", "learned", "none"])
def test_the_correct_cache_passes_bit_for_bit(positional: str) -> None:
    check_evicted(make_target(sinks_window_cache), _case(positional), DECLARED)


def test_a_cache_that_moves_kept_keys_to_new_positions_is_killed() -> None:
    with pytest.raises(AssertionError, match=r"layer 0, update 2, batch row 0, KV head 0, slot 2, which "
                                             r"kept_positions says holds position \d+: the cached key differs"):
        check_evicted(make_target(mutants.rerotates_kept), _case(), DECLARED)


def test_a_cache_that_keeps_one_token_too_few_is_killed() -> None:
    with pytest.raises(EvictionMismatch, match=r"layer 0 holds 4 slots after a prefill of 11 tokens; expected "
                                               r"n_kept = 5"):
        check_evicted(make_target(mutants.keeps_one_too_few), _case(), DECLARED)


def test_a_cache_that_counts_kept_tokens_as_its_length_is_killed() -> None:
    with pytest.raises(Exception, match=r"get_seq_length\(0\) returned 5; expected 11"):
        check_evicted(make_target(mutants.counts_kept), _case(), DECLARED)


def test_a_kept_set_off_the_rule_is_named() -> None:
    class KeepsOldest(SinksWindowCache):  # the right count, the wrong tokens: the oldest instead of the newest
        def compress(self, layer_idx: int) -> None:
            n = self.kept_count(self.keys[layer_idx].shape[-2])
            self.keys[layer_idx] = self.keys[layer_idx][:, :, :n]
            self.values[layer_idx] = self.values[layer_idx][:, :, :n]
            self.slots[layer_idx] = self.slots[layer_idx][:n]

    def factory(config: ModelConfig) -> KeepsOldest:
        return KeepsOldest()

    factory.kvverify_declaration = sinks_window_cache.kvverify_declaration  # type: ignore[attr-defined]
    with pytest.raises(EvictionMismatch, match=r"layer 0 kept slots .*keeps the first 2 and the newest: "
                                               r"\[0, 1, 8, 9, 10\]"):
        check_evicted(make_target(factory), _case(), DECLARED)


def test_only_the_generation_properties_run_for_a_compressing_cache() -> None:
    target = make_target(sinks_window_cache)
    runs = [name for name, prop in PROPERTIES.items() if prop.skip_reason(target) is None]
    assert runs == ["cached_equals_uncached", "continuation"]
    assert "keeps a subset" in (PROPERTIES["crop"].skip_reason(target) or "")


def _turn(case: Case, tokens: int = 3) -> tuple[torch.Tensor, int]:
    return torch.arange(tokens).repeat(case.batch, 1), 4  # a new turn of 3 tokens per row, then 4 more


def test_a_second_call_from_the_compressed_cache_passes() -> None:
    case = _case()
    check_evicted(make_target(sinks_window_cache), case, DECLARED, then=_turn(case))


def test_a_cache_that_compresses_the_second_call_again_is_killed() -> None:
    class CompressesEveryChunk(SinksWindowCache):  # any multi-token update taken for a prefill
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
            keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
            if key_states.shape[-2] > 1 and layer_idx < len(self.keys) and self.seen[layer_idx] > key_states.shape[-2]:
                self.compress(layer_idx)
            return keys, values

    def factory(config: ModelConfig) -> CompressesEveryChunk:
        return CompressesEveryChunk()

    factory.kvverify_declaration = sinks_window_cache.kvverify_declaration  # type: ignore[attr-defined]
    case = _case()
    with pytest.raises(EvictionMismatch, match=r"layer 0, 7 token\(s\) after the prefill: holds slots"):
        check_evicted(make_target(factory), case, DECLARED, then=_turn(case))


def test_the_search_passes_the_cache_and_finds_a_mutant() -> None:
    check_cache(sinks_window_cache, profile="dev", seed=0, max_examples=15, properties=["cached_equals_uncached"])
    with pytest.raises(CacheCheckFailed, match="expected n_kept"):
        check_cache(mutants.keeps_one_too_few, profile="dev", seed=0, max_examples=30,
                    properties=["cached_equals_uncached"])
