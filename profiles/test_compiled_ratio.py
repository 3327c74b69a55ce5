"""The compiled and eager engines against transformers on the bench shape, alternating in one process.

Six timings per round, round-robin (prompt 16, 256 new tokens, one thread): the compiled engine's ``generate``
(CompiledDecoder, a static cache of 272 slots) and the shared greedy loop driving its compiled step; the eager
``ReferenceModel.generate`` and the shared loop over its contiguous cache; transformers' ``generate()`` and its
bare forward loop over a DynamicCache. Prints per-round ratios' medians, and the load average (``uptime``) before
and after: the machine is shared. Goals (compiled): generate <= 0.25 x transformers' generate() and <= 0.35 x its
forward loop; the shared loop <= 0.35 x transformers' loop over a DynamicCache.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvverify.caches import ContiguousCache
from kvverify.engine.compiled import CompiledDecoder
from kvverify.engine.generation import generate
from kvverify.profiling import engines, timing
from profiles.conftest import fast_config, reference, tokens

pytestmark = pytest.mark.benchmark
PROMPT, NEW_TOKENS = 16, int(os.environ.get("KVVERIFY_RATIO_TOKENS", "256"))
ROUNDS = int(os.environ.get("KVVERIFY_RATIO_ROUNDS", "9"))


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def test_compiled_and_eager_vs_transformers(benchmark: Any) -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters.hf import CACHES
    from kvverify.adapters.hf.generation import cache_keyword, library_generate
    from kvverify.adapters.hf.llama import to_llama

    config = fast_config("bench")
    model = reference(config)
    llama, prompt = to_llama(model, attn_implementation="sdpa"), tokens(config, PROMPT)
    length, keyword = PROMPT + NEW_TOKENS, cache_keyword(llama)
    dynamic = CACHES["dynamic"].target
    assert dynamic is not None
    decoder = CompiledDecoder(model, max_len=length)
    compiled_step, eager_step, llama_step = engines.compiled_step(model, length), timing.reference_step(model), \
        timing.llama_step(llama)

    def per_token(run: Callable[[], Any]) -> Callable[[], float]:
        return lambda: timing.generate_seconds_per_token(lambda cache: run(), lambda: None, NEW_TOKENS)

    timings: dict[str, Callable[[], float]] = {
        "compiled generate": per_token(lambda: decoder.generate(prompt, NEW_TOKENS)[0]),
        "eager generate": per_token(lambda: generate(model, prompt, NEW_TOKENS).tokens),
        "transformers generate()": per_token(lambda: library_generate(llama, prompt, NEW_TOKENS, dynamic(config),
                                                                      keyword)),
        "compiled shared loop (static)": lambda: timing.greedy_seconds_per_token(
            compiled_step, lambda: engines.generation_cache(model, 1, length), prompt, NEW_TOKENS),
        "eager shared loop (contiguous)": lambda: timing.greedy_seconds_per_token(
            eager_step, ContiguousCache, prompt, NEW_TOKENS),
        "transformers loop (DynamicCache)": lambda: timing.greedy_seconds_per_token(
            llama_step, lambda: dynamic(config), prompt, NEW_TOKENS),
    }
    assert torch.equal(decoder.generate(prompt, NEW_TOKENS)[0], generate(model, prompt, NEW_TOKENS).tokens)

    def measure() -> dict[str, list[float]]:
        for run in timings.values():  # warm-up: compile, first-call costs
            run()
        samples: dict[str, list[float]] = {name: [] for name in timings}
        for _ in range(ROUNDS):
            for name, run in timings.items():
                samples[name].append(run())
        return samples

    before = _load()
    samples = benchmark.pedantic(measure, rounds=1, iterations=1)
    after = _load()
    ratios = {
        "compiled generate / transformers generate()": ("compiled generate", "transformers generate()"),
        "compiled generate / transformers loop": ("compiled generate", "transformers loop (DynamicCache)"),
        "compiled shared loop / transformers loop": ("compiled shared loop (static)",
                                                     "transformers loop (DynamicCache)"),
        "eager generate / transformers generate()": ("eager generate", "transformers generate()"),
        "eager generate / transformers loop": ("eager generate", "transformers loop (DynamicCache)"),
        "eager shared loop / transformers loop": ("eager shared loop (contiguous)", "transformers loop (DynamicCache)"),
    }
    lines = [f"\nbench shape, prompt {PROMPT}, {NEW_TOKENS} new tokens, {ROUNDS} rounds, "
             f"{torch.get_num_threads()} thread(s); before: {before}; after: {after}"]
    for name, values in samples.items():
        lines.append(f"  {name:34s} median {1e3 * statistics.median(values):.3f} ms/token")
        benchmark.extra_info[f"{name} ms/token"] = 1e3 * statistics.median(values)
    for label, (first, second) in ratios.items():
        ratio = statistics.median(a / b for a, b in zip(samples[first], samples[second], strict=True))
        lines.append(f"  {label:44s} {ratio:.3f}")
        benchmark.extra_info[label] = ratio
    print("\n".join(lines))
