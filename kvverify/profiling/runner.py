"""Run a :class:`~kvverify.profiling.plan.Plan`: time, memory and the analytical model for every cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvverify.adapters.hf.llama import to_llama
from kvverify.profiling import analysis, cuda, engines, hostmem, timing
from kvverify.profiling.environment import describe
from kvverify.profiling.plan import CacheSpec, Plan
from kvverify.profiling.replay import UpdatePlan, replay
from kvverify.profiling.results import CacheRow, Profile, RatioRow
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

#: progress(done, total, what is starting)
Progress = Callable[[int, int, str], None]

#: (reference cache, transformers cache) pairs timed against each other in one greedy forward loop.
RATIO_PAIRS: tuple[tuple[str, str], ...] = (("contiguous", "hf-dynamic"), ("static", "hf-static"))
#: The pairs of the compiled engine, which needs a static cache (sized to the generation, kvverify.profiling.engines).
COMPILED_PAIRS: tuple[tuple[str, str], ...] = (("static", "hf-dynamic"), ("static", "hf-static"))
#: The pair timed through each library's own generate(): their default caches.
GENERATE_PAIR = ("contiguous", "hf-dynamic")


class _Models:
    """The reference model per window, and its LlamaForCausalLM twin, built once per preset."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._reference: dict[int | None, ReferenceModel] = {}
        self._llama: Any = None

    def reference(self, window: int | None) -> ReferenceModel:
        if window not in self._reference:
            self._reference[window] = ReferenceModel(self.config.replace(sliding_window=window))
        return self._reference[window]

    def llama(self) -> Any:
        if self._llama is None:  # transformers' default (SDPA) attention
            self._llama = to_llama(self.reference(None), attn_implementation="sdpa")
        return self._llama


def _tokens(config: ModelConfig, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator).to(config.device)  # (1, length)


def count_tasks(plan: Plan, specs: list[CacheSpec]) -> int:
    per_preset = [len(lengths) * (len(specs) + 2) for lengths in plan.presets.values()]
    return sum(per_preset) + 3  # tracemalloc check, ratio, CUDA


def run_profile(plan: Plan, specs: list[CacheSpec], progress: Progress, out_dir: Path | None = None) -> Profile:
    """Measure every spec at every length of every preset, then the reference-vs-transformers time ratio."""
    began = time.perf_counter()
    first_config = ModelConfig.preset(next(iter(plan.presets)), numerics="fast", device=plan.device)
    profile = Profile(environment={**describe(first_config.dtype, plan.device).as_dict(), "engine": plan.engine})
    total, done = count_tasks(plan, specs), 0

    def tick(what: str) -> None:
        nonlocal done
        progress(done, total, what)
        done += 1

    tick("tracemalloc vs memray")
    profile.tracemalloc_bytes, profile.memray_bytes = hostmem.tracemalloc_vs_memray()
    models_by_preset: dict[str, _Models] = {}
    for preset, lengths in plan.presets.items():
        config = ModelConfig.preset(preset, numerics="fast", device=plan.device)
        models = models_by_preset[preset] = _Models(config)
        window = plan.window_for(config)
        uncached: dict[tuple[str, int], float] = {}
        for length in lengths:
            tokens = _tokens(config, length, seed=length)
            tick(f"{preset}: uncached reference steps at {length}")
            uncached[("reference", length)] = timing.time_uncached(
                timing.reference_step(models.reference(None)), tokens, plan.repeats
            )
            uncached[("windowed", length)] = timing.time_uncached(
                timing.reference_step(models.reference(window)), tokens, plan.repeats
            )
            tick(f"{preset}: uncached transformers step at {length}")
            if any(spec.transformers for spec in specs):
                try:
                    uncached[("transformers", length)] = timing.time_uncached(
                        timing.llama_step(models.llama()), tokens, plan.repeats
                    )
                except (ImportError, ValueError) as error:
                    profile.skipped.append(f"transformers on {preset}: {error}")
                    specs = [spec for spec in specs if not spec.transformers]
        for spec in specs:
            spec_config = config.replace(sliding_window=window) if spec.windowed else config
            for length in lengths:
                tick(f"{preset}: {spec.name} at {length}")
                profile.rows.append(
                    _measure(
                        plan, preset, spec, spec_config, models, length, uncached, window if spec.windowed else None
                    )
                )
    tick("reference vs transformers")
    profile.ratios.extend(_ratios(plan, models_by_preset, specs, profile))
    tick("CUDA")
    profile.cuda = _cuda(plan, models_by_preset, out_dir, profile)
    profile.seconds = time.perf_counter() - began
    progress(total, total, "done")
    return profile


def _measure(
    plan: Plan,
    preset: str,
    spec: CacheSpec,
    config: ModelConfig,
    models: _Models,
    length: int,
    uncached: dict[tuple[str, int], float],
    window: int | None,
) -> CacheRow:
    if spec.transformers:
        step, uncached_key = timing.llama_step(models.llama()), "transformers"
    else:
        step = timing.reference_step(models.reference(window))
        uncached_key = "windowed" if window is not None else "reference"
    tokens = _tokens(config, length + plan.steps, seed=length)
    timed = timing.time_cached(step, spec.make(config), tokens, length)
    run = replay(spec.make, config, UpdatePlan(batch=1, prompt=min(plan.prompt, length), length=length))
    filled: list[Any] = []
    try:
        seen = hostmem.memray_allocations(lambda: filled.append(run()))
        peak, churn, count = seen.peak_bytes, seen.total_bytes, seen.count
    except RuntimeError:  # another memray Tracker is active (pytest --memray): no host figures this time
        filled.append(run())
        peak = churn = count = -1
    cache = filled[-1]
    flops = analysis.flops_per_token(config, length)
    return CacheRow(
        preset=preset,
        cache=spec.name,
        layout=spec.layout,
        window=window,
        length=length,
        prefill_s=timed.prefill_s,
        cached_step_s=timed.step_s,
        uncached_step_s=uncached.get((uncached_key, length)),
        held_bytes=hostmem.held_bytes(cache),
        formula_bytes=analysis.kv_bytes(config, length, window=window),
        predicted_bytes=None if spec.layout is None else analysis.predicted_cache_bytes(spec.layout, config, length),
        memray_peak_bytes=peak,
        churn_bytes=churn,
        churn_count=count,
        flops_cached=flops.cached,
        flops_uncached=flops.uncached,
        uncached_peak_estimate_bytes=analysis.uncached_peak_bytes(config, length),
    )


def _ratios(
    plan: Plan, models_by_preset: dict[str, _Models], specs: list[CacheSpec], profile: Profile
) -> list[RatioRow]:
    by_name = {spec.name: spec for spec in specs}
    preset = next(iter(plan.presets))
    models = models_by_preset[preset]
    timed: list[tuple[str, str, str, timing.Ratio]] = []
    pairs = COMPILED_PAIRS if plan.engine == "compiled" else RATIO_PAIRS
    for ours, theirs in pairs:
        if ours not in by_name or theirs not in by_name:
            profile.skipped.append(f"ratio {ours} vs {theirs}: one of them was not profiled")
            continue
        timed.append(("forward", ours, theirs, _forward_ratio(plan, models, by_name[ours], by_name[theirs])))
    ours, theirs = GENERATE_PAIR
    if ours in by_name and theirs in by_name:
        ratio = _generate_ratio(plan, models, by_name[ours], by_name[theirs], profile)
        if ratio is not None:
            timed.append(("generate", "static" if plan.engine == "compiled" else ours, theirs, ratio))
    return [
        RatioRow(
            preset=preset,
            loop=loop,
            reference_cache=ours,
            transformers_cache=theirs,
            prompt=plan.prompt,
            new_tokens=plan.ratio_tokens,
            rounds=plan.ratio_rounds,
            reference_s_per_token=ratio.first_median_s,
            transformers_s_per_token=ratio.second_median_s,
            ratio=ratio.ratio,
            engine=plan.engine,
        )
        for loop, ours, theirs, ratio in timed
    ]


def _forward_ratio(plan: Plan, models: _Models, ours: CacheSpec, theirs: CacheSpec) -> timing.Ratio:
    config = models.config
    if plan.engine == "compiled":
        return engines.forward_ratio(models.reference(None), models.llama(), lambda: theirs.make(config),
                                     _tokens(config, plan.prompt, seed=1), plan.ratio_tokens, plan.ratio_rounds)
    return timing.forward_ratio(
        models.reference(None),
        models.llama(),
        lambda: ours.make(config),
        lambda: theirs.make(config),
        _tokens(config, plan.prompt, seed=1),
        plan.ratio_tokens,
        plan.ratio_rounds,
    )


def _generate_ratio(
    plan: Plan, models: _Models, ours: CacheSpec, theirs: CacheSpec, profile: Profile
) -> timing.Ratio | None:
    """The ``generate()`` row, left out with the reason when the two models choose different tokens."""
    config = models.config
    if plan.engine == "compiled":
        ratio = engines.generate_ratio(models.reference(None), models.llama(), lambda: theirs.make(config),
                                       _tokens(config, plan.prompt, seed=1), plan.ratio_tokens, plan.ratio_rounds)
    else:
        ratio = timing.generate_ratio(models.reference(None), models.llama(), lambda: ours.make(config),
                                      lambda: theirs.make(config), _tokens(config, plan.prompt, seed=1),
                                      plan.ratio_tokens, plan.ratio_rounds)
    if ratio is None:
        profile.skipped.append("ratio through generate(): the two models chose different tokens")
    return ratio


def _cuda(
    plan: Plan, models_by_preset: dict[str, _Models], out_dir: Path | None, profile: Profile
) -> dict[str, object] | None:
    if not plan.device.startswith("cuda"):
        profile.skipped.append("CUDA memory: --device cpu (run with --device cuda on a machine with a GPU)")
        return None
    reason = cuda.unavailable_reason()
    if reason is not None:
        profile.skipped.append(f"CUDA memory: {reason}")
        return None
    preset, lengths = next(iter(plan.presets.items()))
    models = models_by_preset[preset]
    model, config, length = models.reference(None), models.config, max(lengths)
    from kvverify.caches import ContiguousCache

    tokens = _tokens(config, length + plan.steps, seed=2)
    step = timing.reference_step(model)
    cache = ContiguousCache()
    peaks = cuda.cuda_peaks(
        lambda: step(tokens[:, :length], cache, 0),
        lambda: [step(tokens[:, p : p + 1], cache, p) for p in range(length, length + plan.steps)],
        torch.device(plan.device),
    )
    result: dict[str, object] = dict(vars(peaks), length=length, cache="contiguous")
    if out_dir is not None:
        path = cuda.snapshot(lambda: step(tokens[:, :length], ContiguousCache(), 0), out_dir / "cuda_snapshot.pickle")
        result["snapshot"] = path.name
    return result
