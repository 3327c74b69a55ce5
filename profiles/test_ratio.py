"""The reference model's cached decode against transformers' on the bench shape, alternating in one process.

Prints ``reference/transformers per-token decode time``; the goal is at most 0.5 in fast numerics. Two ways:
the same greedy loop driving each model's forward (the leanest loop for both), and each library's own
``generate`` with its default cache (what a user of either library runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling.timing import Ratio, forward_ratio, generate_ratio
from profiles.conftest import fast_config, reference, tokens

pytestmark = pytest.mark.benchmark
NEW_TOKENS, ROUNDS = 128, 9


@pytest.mark.parametrize(("ours", "theirs"), [("contiguous", "hf-dynamic"), ("static", "hf-static")])
def test_reference_vs_transformers(benchmark: Any, ours: str, theirs: str) -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters.hf.llama import to_llama
    from kvverify.profiling.plan import transformers_specs

    config = fast_config("bench")
    model = reference(config)
    llama, prompt = to_llama(model, attn_implementation="sdpa"), tokens(config, 16)
    make_theirs = {spec.name: spec.make for spec in transformers_specs()}[theirs]

    def measure() -> Ratio:
        return forward_ratio(
            model,
            llama,
            lambda: BUILTIN_CACHES[ours](config),
            lambda: make_theirs(config),
            prompt,
            NEW_TOKENS,
            ROUNDS,
        )

    _report(benchmark, measure, f"{ours} vs {theirs}: reference/transformers per-token decode time")


def test_generate_reference_vs_transformers(benchmark: Any) -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters.hf.llama import to_llama
    from kvverify.profiling.plan import transformers_specs

    config = fast_config("bench")
    model = reference(config)
    llama, prompt = to_llama(model, attn_implementation="sdpa"), tokens(config, 16)
    make_theirs = {spec.name: spec.make for spec in transformers_specs()}["hf-dynamic"]

    def measure() -> Ratio:
        ratio = generate_ratio(
            model,
            llama,
            lambda: BUILTIN_CACHES["contiguous"](config),
            lambda: make_theirs(config),
            prompt,
            NEW_TOKENS,
            ROUNDS,
        )
        assert ratio is not None, "the two models chose different tokens: their timings would not be of the same work"
        return ratio

    label = (
        "generate(): ReferenceModel.generate (contiguous) vs LlamaForCausalLM.generate (DynamicCache): "
        "reference/transformers per-token time"
    )
    _report(benchmark, measure, label)


def _report(benchmark: Any, measure: Callable[[], Ratio], label: str) -> None:
    """Run ``measure`` once under pytest-benchmark, keep its figures in ``extra_info`` and print the ratio."""
    ratio = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(
        reference_ms_per_token=1e3 * ratio.first_median_s,
        transformers_ms_per_token=1e3 * ratio.second_median_s,
        ratio=ratio.ratio,
    )
    print(
        f"\n{label} = {ratio.ratio:.3f} "
        f"({1e3 * ratio.first_median_s:.3f} ms vs {1e3 * ratio.second_median_s:.3f} ms)"
    )
