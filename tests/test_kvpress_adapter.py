"""kvpress' presses (kvverify.adapters.kvpress) against the eviction oracle, in kvpress' own environment
(``tox -e lib-kvpress``): bitwise no-ops at ratio 0, the kept tokens bit for bit at ratio 0.5, the kept sets by
their rules, the tokens-seen length the adapter reports where DynamicCache counts the kept ones, the StreamingLLM
sinks chosen by topk's tie-break (a known failure), and KeyRerotationPress, which moves kept keys to new
positions, rejected."""

from __future__ import annotations

import pytest
import torch

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed: tox -e lib-kvpress", exc_type=ImportError)

from kvverify.adapters import kvpress as adapter  # noqa: E402
from kvverify.adapters.known import registry  # noqa: E402
from kvverify.adapters.kvpress_known import streaming_llm_sinks_by_tie  # noqa: E402
from kvverify.checks.case import Case  # noqa: E402
from kvverify.checks.eviction import EvictionMismatch, check_evicted  # noqa: E402
from kvverify.checks.target import make_target  # noqa: E402
from kvverify.protocol import CacheDeclaration, Eviction, ModelConfig  # noqa: E402
from kvverify.reference.model import ReferenceModel  # noqa: E402
from kvverify.runs import check_cache  # noqa: E402

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, max_seq_len=32,
                     max_batch_size=2, dtype=torch.float32)


def _case(prompt: int = 12, new: int = 4, positional: str = "rope") -> Case:
    rows = torch.randint(0, 32, (2, prompt), generator=torch.Generator().manual_seed(2)).tolist()
    return Case(CONFIG.replace(positional=positional), tuple(tuple(r) for r in rows), (0, 0), new)


def _prompt(length: int = 12) -> torch.Tensor:
    return torch.randint(0, 32, (2, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("press", ["KnormPress", "StreamingLLMPress"])
def test_ratio_zero_is_no_compression_bit_for_bit(press: str) -> None:
    model = ReferenceModel(CONFIG, seed=0)
    cache = adapter.pressed_cache(getattr(kvpress, press)(compression_ratio=0.0), CONFIG)
    actual = model.generate(_prompt(), 6, cache=cache)
    assert torch.equal(actual.logits, model.generate(_prompt(), 6, use_cache=False).logits)
    assert cache.cache.get_seq_length() == 12 + 5


def test_dynamic_cache_counts_kept_tokens_and_the_adapter_counts_seen_ones() -> None:
    model = ReferenceModel(CONFIG, seed=0)
    cache = adapter.knorm_press_cache(CONFIG)
    model(_prompt(), cache=cache)  # the prefill: 12 tokens, compressed to 6 per head
    assert cache.cache.get_seq_length() == 6  # what a forward without explicit positions would start from
    assert cache.get_seq_length() == 12  # the next token's position: what the protocol asks
    assert cache.kept_positions(0).shape == (2, 2, 6)


@pytest.mark.parametrize("factory", ["knorm_press_cache", "streaming_llm_past_sinks_cache", "keydiff_press_cache",
                                     "random_press_cache"])
@pytest.mark.parametrize("positional", ["rope", "none"])
def test_kept_tokens_are_the_recomputed_ones_bit_for_bit(factory: str, positional: str) -> None:
    made = getattr(adapter, factory)
    check_evicted(make_target(made), _case(positional=positional), made.kvverify_declaration.keeps)


@pytest.mark.parametrize("factory", ["knorm_press_cache", "streaming_llm_past_sinks_cache"])
def test_a_second_call_is_not_compressed_again(factory: str) -> None:
    made, case = getattr(adapter, factory), _case()
    turn = (torch.arange(3).repeat(2, 1), 4)  # 3 new tokens per row, then 4 more from the returned cache
    check_evicted(make_target(made), case, made.kvverify_declaration.keeps, then=turn)


def test_knorm_keeps_the_smallest_key_norms_per_head() -> None:
    model = ReferenceModel(CONFIG, seed=0)
    cache = adapter.knorm_press_cache(CONFIG)
    keys = {}

    class Spy(adapter.PressedCache):  # the keys the prefill wrote, to recompute the rule here
        def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kw: dict | None = None):  # type: ignore[no-untyped-def, override]
            keys.setdefault(layer_idx, k)
            return super().update(k, v, layer_idx, kw)

    cache.__class__ = Spy
    model(_prompt(), cache=cache)
    norms = torch.linalg.vector_norm(keys[1].double(), dim=-1)  # (B, Hkv, 12)
    smallest = norms.topk(6, dim=-1, largest=False).indices.sort(dim=-1).values
    assert torch.equal(cache.kept_positions(1).sort(dim=-1).values, smallest)
    assert not torch.equal(cache.kept_positions(1)[:, 0], cache.kept_positions(1)[:, 1])  # heads differ


def test_streaming_llm_keeps_sinks_by_topk_tie_break_below_two_n_sink() -> None:
    made = adapter.streaming_llm_press_cache
    with pytest.raises(EvictionMismatch, match=r"kept slots \[\[\[1, 3\], \[1, 3\]\].*keeps the first 4 and the "
                                               r"newest: \[0, 1\]"):
        check_evicted(make_target(made), _case(prompt=5), made.kvverify_declaration.keeps)
    assert streaming_llm_sinks_by_tie() == "StreamingLLMPress(0.5, n_sink=4) on 5 tokens kept slots [1, 3], not [0, 1]"
    known = registry().match("kvpress-streaming-llm", "cached_equals_uncached",
                             "layer 0 kept slots [[[1, 3]]]; Eviction(...) keeps the first 4 and the newest: [0, 1]")
    assert known is not None and known.name == "kvpress-streaming-llm-sinks-by-tie"


def test_key_rerotation_press_moves_kept_keys_and_is_rejected() -> None:
    """KeyRerotationPress (StreamingLLM as its paper runs it) rotates each kept key to its index among the kept:
    the same tokens at new positions, which the oracle's contract (original positions) rejects."""

    def rerotated(config: ModelConfig) -> adapter.PressedCache:
        press = kvpress.KeyRerotationPress(press=kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=2))
        return adapter.pressed_cache(press, config)

    rerotated.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
        keeps=Eviction("sinks_window", 0.5, n_sink=2))
    with pytest.raises(AssertionError, match=r"which kept_positions says holds position \d+: the cached key "
                                             r"differs from the recomputed one"):
        check_evicted(make_target(rerotated), _case(), Eviction("sinks_window", 0.5, n_sink=2))


def test_the_search_passes_knorm() -> None:
    check_cache(adapter.knorm_press_cache, profile="dev", seed=0, max_examples=10,
                properties=["cached_equals_uncached", "continuation"])
