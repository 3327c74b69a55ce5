"""The benchmark engine's decode step against this CPU's floor, and where its time goes.

On the bench shape (prompt 16, 256 new tokens, batch 1, one thread): the floor of one step is the larger of the
bytes it reads (weights, keys and values at the mean context) over the read bandwidth measured here and its FLOPs
over the matmul throughput measured here (:mod:`kvverify.profiling.floor`). Timed round-robin per token: the
eager decode step (:class:`~kvverify.engine.decode.DecodeStep`) and the compiled one (inductor) in the shared
greedy loop, and ``CompiledDecoder.generate``, whose compiled graph includes the argmax. Prints each against the
floor, then ``torch.profiler``'s table of the eager step: the operators' own CPU time per step.
"""

from __future__ import annotations

import os
import statistics
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

    runs = {
        "eager step (shared loop)": lambda: per_token(eager, ContiguousCache),
        "compiled step (shared loop)": lambda: per_token(compiled, lambda: engines.generation_cache(model, 1, length)),
        "compiled generate (argmax in the graph)": lambda: timing.generate_seconds_per_token(
            lambda cache: decoder.generate(prompt, NEW_TOKENS)[0], lambda: None, NEW_TOKENS),
    }
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
    for name, seconds in samples.items():
        median = statistics.median(seconds)
        print(f"{name}: {median * 1e3:.3f} ms/token, {median / least:.1f}x the floor")
        assert median >= least, f"{name} beat the floor ({median:.2e} s < {least:.2e} s): the floor is wrong"

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
