"""The reference model's cached decode against transformers' on the bench shape, alternating in one process.

Prints ``reference/transformers per-token decode time``; the goal is at most 0.5 in fast numerics.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling.timing import alternating, greedy_seconds_per_token, llama_step, reference_step
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
