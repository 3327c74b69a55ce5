"""The standard quantizers against their reference caches: Int8PerTokenCache, KIVI-2 and KIVI-4 replay bit for
bit in strict numerics (prefill, decode, chunks, left padding, every dtype), and 1% scale errors planted in each
are killed by the replay at once while the plain tolerance lets them through."""

from __future__ import annotations

import pytest
import torch

from kvverify.caches import Int8PerTokenCache
from kvverify.caches.kivi import kivi2_cache, kivi4_cache
from kvverify.checks.replay import ReplayCache
from kvverify.mutants.quantized import MUTANTS, QuantizedMutant
from kvverify.protocol.cache import CacheFactory, declaration_of
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, max_seq_len=48)
FACTORIES: dict[str, CacheFactory] = {"int8": Int8PerTokenCache.from_config, "kivi2": kivi2_cache,
                                      "kivi4": kivi4_cache}


def generations(factory: CacheFactory, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits through the cache and through the replay of its declared quantizer: a 3-token chunk on a 6-token
    left-padded prompt of 2 rows, then 30 decoded tokens (several key groups and value residuals)."""
    model = ReferenceModel(config, seed=2)
    prompt = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # row 1 is left-padded by 2
    quantizer = declaration_of(factory(config), factory).quantizer
    assert quantizer is not None, "the reference caches declare their quantizer"
    logits = []
    for cache in (factory(config), ReplayCache(quantizer)):
        model(prompt[:, :6], cache=cache, attention_mask=mask[:, :6])
        logits.append(model.generate(prompt, 30, cache=cache, attention_mask=mask).logits)
    return logits[0], logits[1]


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_reference_caches_replay_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    cached, replayed = generations(FACTORIES[name], CONFIG.replace(dtype=dtype))
    assert torch.equal(cached, replayed), (
        f"{name} ({dtype}): the cache and the replay of its quantizer differ by "
        f"{float((cached - replayed).abs().max())}")


def test_the_replay_tells_kivi2_from_kivi4() -> None:
    kivi2 = declaration_of(kivi2_cache(CONFIG)).quantizer
    assert kivi2 is not None
    model = ReferenceModel(CONFIG, seed=2)
    prompt = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(3))
    replayed = model.generate(prompt, 12, cache=ReplayCache(kivi2)).logits
    assert not torch.equal(replayed, model.generate(prompt, 12, cache=kivi4_cache(CONFIG)).logits)


def test_the_reference_caches_pass_cached_equals_uncached_bitwise_in_the_suite() -> None:
    from kvverify.runs import run_suite

    for name, factory in FACTORIES.items():
        result = run_suite(factory, target=name, profile="dev", seed=1, properties=["cached_equals_uncached"],
                           max_examples=15)
        assert result.ok, f"{name}: {[r.detail for r in result.failures]}"
        assert result.results[0].largest_difference == 0.0, f"{name} is not replayed bit for bit"


NEW_MUTANTS = [m for m in MUTANTS if not m.name.startswith("fp8")]


def teacher_forced(model: ReferenceModel, cache: object, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits (B, T - prompt + 1, V) of a prefill of ``prompt`` tokens, then each later token fed one at a time:
    the same tokens whatever the cache's logits, so two caches' logits compare step by step."""
    steps = [model(tokens[:, :prompt], cache=cache, last_only=True)]
    for t in range(prompt, tokens.shape[1]):
        steps.append(model(tokens[:, t:t + 1], cache=cache, start=t))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("mutant", NEW_MUTANTS, ids=[m.name for m in NEW_MUTANTS])
def test_a_one_percent_scale_error_is_a_bitwise_difference_far_below_the_tolerance(mutant: QuantizedMutant) -> None:
    atol, quantizer = mutant.declared()
    model = ReferenceModel(CONFIG, seed=2)
    tokens = torch.randint(0, 32, (2, 30), generator=torch.Generator().manual_seed(3))
    planted = teacher_forced(model, mutant.factory(True)(CONFIG), tokens, 6)
    replayed = teacher_forced(model, ReplayCache(quantizer), tokens, 6)
    assert not torch.equal(planted, replayed), f"{mutant.name}: the replay does not see the planted error"
    error = float((planted - replayed).abs().max())
    assert error < atol / 10, f"{mutant.name}: the planted error moves logits by {error}, not far below {atol}"


def test_the_suite_kills_a_scale_error_with_the_replay_and_not_with_the_tolerance() -> None:
    from kvverify.runs import run_suite

    mutant = next(m for m in MUTANTS if m.name == "int8_newest_value_scale_1pct")
    replay = run_suite(mutant.factory(True), target="replay", profile="ci", seed=0,
                       properties=["cached_equals_uncached"], max_examples=10)
    assert not replay.ok and "declared quantizer" in replay.failures[0].detail
    plain = run_suite(mutant.factory(False), target="plain", profile="ci", seed=0,
                      properties=["cached_equals_uncached"], max_examples=10)
    assert plain.ok, f"{mutant.name} was caught by the tolerance alone: not a subtle error"


def test_kivi_crops_full_precision_tokens_and_refuses_to_cut_quantized_ones() -> None:
    cache = kivi2_cache(CONFIG)  # residual 8: after 10 tokens, keys 0..7 and values 0..1 are quantized
    states = torch.randn(1, CONFIG.n_kv_heads, 10, CONFIG.head_dim)
    for layer in range(CONFIG.n_layers):
        cache.update(states, states, layer)
    cache.crop(9)
    assert cache.get_seq_length() == 9
    with pytest.raises(ValueError, match="the first 8 are quantized"):
        cache.crop(5)
    assert cache.get_seq_length() == 9, "a refused crop changes nothing"
    keys, values = cache.update(states[:, :, :1], states[:, :, :1], 0)
    assert keys.shape[-2] == values.shape[-2] == 10


def test_a_cache_with_its_own_round_trip_replays_bit_for_bit() -> None:
    from tests.targets.static_fp8 import static_fp8

    for dtype in (torch.float32, torch.bfloat16):
        cached, replayed = generations(static_fp8, CONFIG.replace(dtype=dtype))
        assert torch.equal(cached, replayed), f"static fp8 ({dtype}): differs by {(cached - replayed).abs().max()}"


def test_examples_after_a_check_rejects_one_are_still_counted() -> None:
    # KIVI refuses crops into quantized tokens; a refused crop keeps the drafts, and a case with no room left
    # after them is rejected by the check. Passing examples after such a reject were once not counted (2 of 40).
    from kvverify.runs import run_suite

    result = run_suite(kivi4_cache, target="kivi4", profile="ci", seed=0, properties=["crop"])
    assert result.ok and result.results[0].examples >= 30, result.results[0]
