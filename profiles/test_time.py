"""Prefill and per-token decode time, cached vs uncached, for every built-in cache and transformers' caches.

tox -e bench saves the results as pytest-benchmark JSON; compare runs with
``pytest profiles -m benchmark --benchmark-only --benchmark-compare --benchmark-compare-fail=mean:10%``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling import analysis
from kvverify.profiling.hostmem import held_bytes
from kvverify.profiling.timing import StepFn, llama_step, reference_step
from profiles.conftest import LENGTHS, fast_config, reference, tokens

pytestmark = pytest.mark.benchmark
WINDOW = 256
CASES = [(preset, length) for preset, lengths in LENGTHS.items() for length in lengths]
CACHES = [*BUILTIN_CACHES, "hf-dynamic", "hf-static"]


def _setup(name: str, preset: str) -> tuple[Any, StepFn, Callable[[], Any]]:
    """(config, step function, cache factory) of a cache name: transformers' caches run in LlamaForCausalLM."""
    if name.startswith("hf-"):
        pytest.importorskip("transformers")
        from kvverify.adapters.hf.llama import to_llama
        from kvverify.profiling.plan import transformers_specs

        config = fast_config(preset)
        make = {spec.name: spec.make for spec in transformers_specs()}[name]
        return config, llama_step(to_llama(reference(config), attn_implementation="sdpa")), lambda: make(config)
    windowed = name == "sliding"
    config = fast_config(preset, sliding_window=min(WINDOW, fast_config(preset).max_seq_len // 2) if windowed else None)
    return config, reference_step(reference(config)), lambda: BUILTIN_CACHES[name](config)


def _info(benchmark: Any, config: Any, length: int, seconds_per_token: float, cache: Any, cached: bool) -> None:
    flops = analysis.flops_per_token(config, length)
    benchmark.extra_info.update(
        tokens_per_s=1.0 / seconds_per_token if seconds_per_token else None,
        bytes_held=held_bytes(cache) if cache is not None else 0,
        kv_bytes_formula=analysis.kv_bytes(config, length, window=config.sliding_window),
        flops_per_token=flops.cached if cached else flops.uncached,
        length=length,
    )


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize(("preset", "length"), CASES)
def test_decode_step(benchmark: Any, name: str, preset: str, length: int) -> None:
    """One cached decode step with ``length`` tokens already in the cache."""
    config, step, make = _setup(name, preset)
    ids = tokens(config, length + 1)
    caches: list[Any] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        cache = make()
        step(ids[:, :length], cache, 0)
        caches.append(cache)
        return (ids[:, length:], cache, length), {}

    benchmark.pedantic(step, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    _info(benchmark, config, length, benchmark.stats.stats.median, caches[-1], cached=True)


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize(("preset", "length"), CASES)
def test_prefill(benchmark: Any, name: str, preset: str, length: int) -> None:
    """A forward over ``length`` prompt tokens into an empty cache."""
    config, step, make = _setup(name, preset)
    ids = tokens(config, length)
    caches: list[Any] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        caches.append(make())
        return (ids, caches[-1], 0), {}

    benchmark.pedantic(step, setup=setup, rounds=3, iterations=1)
    _info(benchmark, config, length, benchmark.stats.stats.median / length, caches[-1], cached=True)


@pytest.mark.parametrize("model", ["reference", "transformers"])
@pytest.mark.parametrize(("preset", "length"), CASES)
def test_uncached_step(benchmark: Any, model: str, preset: str, length: int) -> None:
    """One uncached decode step at ``length``: a forward over the whole prefix, as ``x[1:t+1] = LLM(x[1:t])``."""
    config, step, _ = _setup("hf-dynamic" if model == "transformers" else "contiguous", preset)
    ids = tokens(config, length)
    with torch.no_grad():
        benchmark.pedantic(step, args=(ids, None, 0), rounds=3, iterations=1, warmup_rounds=1)
    _info(benchmark, config, length, benchmark.stats.stats.median, None, cached=False)
