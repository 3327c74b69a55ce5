"""The benchmark engine's decode step against this CPU's floor, and where its time goes.

On the bench shape (prompt 16, 256 new tokens, batch 1, one thread): the floor of one step is the larger of the
bytes it reads (weights, keys and values at the mean context) over the read bandwidth measured here and its FLOPs
over the matmul throughput measured here (:mod:`kvverify.profiling.floor`). Timed round-robin per token: the
eager decode step (:class:`~kvverify.engine.decode.DecodeStep`) and the compiled one (inductor) in the shared
greedy loop, ``CompiledDecoder.generate``, whose compiled graph includes the argmax, and transformers' ``generate()``
on the same weights (where transformers is installed). Prints each against the floor and against transformers'
``generate()`` (the goal for the compiled engine: at most 0.2 of it, reported, not asserted), then
``torch.profiler``'s table of the eager step: the operators' own CPU time per step.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from collections.abc import Callable
from typing import Any

import pytest
from torch.profiler import ProfilerActivity, profile

from kvverify.caches import ContiguousCache
from kvverify.engine.compiled import CompiledDecoder
from kvverify.profiling import engines, floor, timing
from profiles.conftest import fast_config, reference, tokens

pytestmark = pytest.mark.benchmark
PROMPT, NEW_TOKENS = 16, int(os.environ.get("KVVERIFY_FLOOR_TOKENS", "256"))
ROUNDS = int(os.environ.get("KVVERIFY_FLOOR_ROUNDS", "7"))
PROFILED_STEPS = 64


def test_decode_step_against_the_floor_of_this_cpu(benchmark: Any) -> None:
    config = fast_config("bench")
    model = reference(config)
    prompt, length = tokens(config, PROMPT), PROMPT + NEW_TOKENS
    work = floor.step_work(config, context=PROMPT + NEW_TOKENS // 2)
    machine = floor.measure_machine(work.bytes)
    least = machine.floor_s(work)
    decoder = CompiledDecoder(model, max_len=length)
    eager, compiled = timing.reference_step(model), engines.compiled_step(model, length)

    def per_token(step: timing.StepFn, make_cache: Any) -> float:
        return timing.greedy_seconds_per_token(step, make_cache, prompt, NEW_TOKENS)

    runs: dict[str, Callable[[], float]] = {
        "eager step (shared loop)": lambda: per_token(eager, ContiguousCache),
        "compiled step (shared loop)": lambda: per_token(compiled, lambda: engines.generation_cache(model, 1, length)),
        "compiled generate (argmax in the graph)": lambda: timing.generate_seconds_per_token(
            lambda cache: decoder.generate(prompt, NEW_TOKENS)[0], lambda: None, NEW_TOKENS),
    }
    theirs = _transformers_generate(model, prompt)
    if theirs is not None:
        runs[THEIRS] = theirs
    for run in runs.values():
        run()  # compiles, warms
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            samples[name].append(run())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

    print(f"\nbench shape, {NEW_TOKENS} tokens after a {PROMPT}-token prompt, {ROUNDS} rounds, load "
          f"{os.getloadavg()[0]:.2f}: a step reads {work.weight_bytes / 1e6:.1f} MB of weights and "
          f"{work.cache_bytes / 1e6:.2f} MB of keys and values, {work.flops / 1e6:.1f} MFLOP; this CPU reads "
          f"{machine.read_bytes_per_s / 1e9:.1f} GB/s from a buffer that size and multiplies at "
          f"{machine.flops_per_s / 1e9:.1f} GFLOP/s: floor {least * 1e3:.3f} ms/token")
    medians = {name: statistics.median(seconds) for name, seconds in samples.items()}
    for name, median in medians.items():
        against = f", {median / medians[THEIRS]:.2f}x {THEIRS}" if THEIRS in medians and name != THEIRS else ""
        print(f"{name}: {median * 1e3:.3f} ms/token, {median / least:.1f}x the floor{against}")
        assert median >= least, f"{name} beat the floor ({median:.2e} s < {least:.2e} s): the floor is wrong"
    if THEIRS not in medians:
        print(f"{THEIRS}: not measured (transformers is not installed)")

    cache = ContiguousCache()
    eager(prompt, cache, 0)
    token = prompt[:, -1:]
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for position in range(PROMPT, PROMPT + PROFILED_STEPS):
            eager(token, cache, position)
    table = profiled.key_averages()
    operators = sum(event.count for event in table if event.key.startswith("aten::")) / PROFILED_STEPS
    print(f"eager step under torch.profiler, {PROFILED_STEPS} steps: {operators:.0f} aten calls per step")
    print(table.table(sort_by="self_cpu_time_total", row_limit=12))


THEIRS = "transformers generate()"


def _transformers_generate(model: Any, prompt: Any) -> Callable[[], float] | None:
    """Seconds per token of transformers' ``generate()`` (a DynamicCache, SDPA) on the model's weights, or None
    without transformers."""
    if importlib.util.find_spec("transformers") is None:
        return None
    from kvverify.adapters.hf import CACHES
    from kvverify.adapters.hf.generation import cache_keyword, library_generate
    from kvverify.adapters.hf.llama import to_llama

    llama = to_llama(model, attn_implementation="sdpa")
    keyword, dynamic = cache_keyword(llama), CACHES["dynamic"].target
    assert dynamic is not None
    return lambda: timing.generate_seconds_per_token(
        lambda cache: library_generate(llama, prompt, NEW_TOKENS, dynamic(model.config), keyword), lambda: None,
        NEW_TOKENS)
