"""The reference model's cached decode against transformers' on the bench shape, alternating in one process.

Prints ``reference/transformers per-token decode time``; the goal is at most 0.5 in fast numerics. Two ways:
the same greedy loop driving each model's forward (the leanest loop for both), and each library's own
``generate`` with its default cache (what a user of either library runs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling.timing import (
    alternating,
    generate_seconds_per_token,
    greedy_seconds_per_token,
    llama_step,
    reference_step,
)
from profiles.conftest import fast_config, reference, tokens

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize(("ours", "theirs"), [("contiguous", "hf-dynamic"), ("static", "hf-static")])
def test_reference_vs_transformers(benchmark: Any, ours: str, theirs: str) -> None:
    pytest.importorskip("transformers")
    from kvverify.profiling.transformers_side import hf_cache, llama_from

    config = fast_config("bench")
    model = reference(config)
    ref_step, hf_step = reference_step(model), llama_step(llama_from(model))
    prompt = tokens(config, 16)

    def measure() -> float:
        ratio = alternating(
            lambda: greedy_seconds_per_token(ref_step, lambda: BUILTIN_CACHES[ours](config), prompt, 128),
            lambda: greedy_seconds_per_token(hf_step, lambda: hf_cache(theirs, config), prompt, 128),
            rounds=9,
        )
        benchmark.extra_info.update(
            reference_ms_per_token=1e3 * ratio.first_median_s,
            transformers_ms_per_token=1e3 * ratio.second_median_s,
            ratio=ratio.ratio,
        )
        return ratio.ratio

    value = benchmark.pedantic(measure, rounds=1, iterations=1)
    print(
        f"\n{ours} vs {theirs}: reference/transformers per-token decode time = {value:.3f} "
        f"({benchmark.extra_info['reference_ms_per_token']:.3f} ms vs "
        f"{benchmark.extra_info['transformers_ms_per_token']:.3f} ms)"
    )


def test_generate_reference_vs_transformers(benchmark: Any) -> None:
    pytest.importorskip("transformers")
    from kvverify.profiling.transformers_side import cache_keyword, hf_cache, llama_from, llama_generate

    config = fast_config("bench")
    model = reference(config)
    llama = llama_from(model)
    keyword = cache_keyword(llama)
    prompt, new_tokens = tokens(config, 16), 128

    def ours(cache: Any) -> Any:
        return model.generate(prompt, new_tokens, cache=cache).sequences

    def theirs(cache: Any) -> Any:
        return llama_generate(llama, prompt, new_tokens, cache, keyword)

    assert torch.equal(ours(BUILTIN_CACHES["contiguous"](config)), theirs(hf_cache("hf-dynamic", config))), (
        "the two models must generate the same tokens for their timings to compare the same work"
    )

    def measure() -> float:
        ratio = alternating(
            lambda: generate_seconds_per_token(ours, lambda: BUILTIN_CACHES["contiguous"](config), new_tokens),
            lambda: generate_seconds_per_token(theirs, lambda: hf_cache("hf-dynamic", config), new_tokens),
            rounds=9,
        )
        benchmark.extra_info.update(
            reference_ms_per_token=1e3 * ratio.first_median_s,
            transformers_ms_per_token=1e3 * ratio.second_median_s,
            ratio=ratio.ratio,
        )
        return ratio.ratio

    value = benchmark.pedantic(measure, rounds=1, iterations=1)
    print(
        f"\ngenerate(): ReferenceModel.generate (contiguous) vs LlamaForCausalLM.generate (DynamicCache): "
        f"reference/transformers per-token time = {value:.3f} "
        f"({benchmark.extra_info['reference_ms_per_token']:.3f} ms vs "
        f"{benchmark.extra_info['transformers_ms_per_token']:.3f} ms)"
    )
