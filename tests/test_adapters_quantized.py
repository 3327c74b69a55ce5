"""Lossy caches against the same loss: the declared quantizer replayed by the oracle (bitwise for transformers'
fp8 cache), a planted 1% error found by the replay, and quanto / HQQ within their measured tolerance."""

from __future__ import annotations

import pytest
import torch

from kvverify.checks.replay import ReplayCache
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.quantizers import Quantizer
from kvverify.reference.model import ReferenceModel

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, max_seq_len=32)


def test_quantizer_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="group_size"):
        Quantizer(kind="int4")
    with pytest.raises(ValueError, match="per tensor"):
        Quantizer(kind="fp8", group_size=4)
    with pytest.raises(ValueError, match="does not divide"):
        Quantizer(kind="int8", group_size=3).round_trip(torch.ones(1, 1, 2, 4))


def test_int_round_trip_keeps_each_groups_extremes_and_is_close() -> None:
    states = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    out = Quantizer(kind="int8", group_size=4).round_trip(states)
    grouped, back = states.reshape(2, 3, 5, 2, 4), out.reshape(2, 3, 5, 2, 4)
    assert torch.equal(grouped.amin(-1), back.amin(-1))
    assert float((out - states).abs().max()) <= float((grouped.amax(-1) - grouped.amin(-1)).max()) / 255


def test_residual_tokens_stay_full_precision_until_the_flush() -> None:
    cache = ReplayCache(Quantizer(kind="int2", group_size=4, residual_length=3))
    first = torch.randn(1, 1, 2, 4)
    assert torch.equal(cache.update(first, first, 0)[0], first)  # the prefill comes back as given
    new = torch.randn(1, 1, 1, 4)
    keys, _ = cache.update(new, new, 0)
    assert torch.equal(keys[:, :, 2:], new) and not torch.equal(keys[:, :, :2], first)
    assert cache.get_seq_length() == 3


def test_fp8_replay_is_bitwise_with_transformers() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")
    from kvverify.adapters.hf.caches import FP8_QUANTIZER, quantized_cache

    for numerics in ("strict", "fast"):
        config = CONFIG.replace(numerics=numerics)
        model = ReferenceModel(config, seed=1)
        prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
        replayed = model.generate(prompt, 12, cache=ReplayCache(FP8_QUANTIZER))
        actual = model.generate(prompt, 12, cache=quantized_cache(config))
        assert torch.equal(replayed.logits, actual.logits)


def test_a_one_percent_error_survives_the_tolerance_and_not_the_replay() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")
    from kvverify.mutants.quantized import MUTANTS
    from kvverify.runs import run_suite

    mutant = MUTANTS[0]
    plain = run_suite(mutant.factory(False), target="plain", profile="dev", seed=0,
                      properties=["cached_equals_uncached"], max_examples=15)
    replay = run_suite(mutant.factory(True), target="replay", profile="dev", seed=0,
                       properties=["cached_equals_uncached"], max_examples=15)
    assert plain.ok
    assert not replay.ok and "declared quantizer" in replay.failures[0].detail


@pytest.mark.parametrize("backend, module", [("quanto", "optimum.quanto"), ("hqq", "hqq")])
def test_group_wise_backends_pass_at_the_suites_head_dims(backend: str, module: str) -> None:
    pytest.importorskip(module, reason=f"{module} is not installed: pip install 'kvverify[{backend}]'")
    from kvverify.adapters.hf.caches import FACTORIES
    from kvverify.runs import check_cache

    check_cache(FACTORIES[backend], profile="dev", seed=0, max_examples=8, properties=["cached_equals_uncached"])
