"""``kvverify profile --preset``: a real model size decoded over contexts and batch sizes on a GPU.

For every (batch, context) it times a decode step with a cache already holding ``context`` tokens, and sets the
cache's bytes held against the analytical formula; a pair whose cache does not fit in the device's free memory
(``torch.cuda.mem_get_info``) is recorded as not fitting, not run. It also times the uncached path (a forward over
the whole context, batch 1) to show where it turns quadratic, the device's read bandwidth (a copy) and so the
weight-read floor of a decode step, and, at batch 1, the reference's decode against transformers' paths.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvverify.caches import StaticCache
from kvverify.engine.compiled import CompiledDecoder
from kvverify.engine.decode import DecodeStep
from kvverify.profiling import analysis, engines, hostmem, timing
from kvverify.profiling.presets import Sweep, weight_bytes
from kvverify.reference.model import ReferenceModel

#: progress(what is starting)
Note = Callable[[str], None]
#: Memory kept free beside a cache that is tried: activations, workspaces, the allocator's slack.
HEADROOM_BYTES = 2 * 2**30


@dataclass(frozen=True)
class DecodeRow:
    batch: int
    context: int
    fits: bool  # False: the cache would not fit in free memory (not run)
    step_s: float | None  # median decode step with `context` tokens cached
    kv_formula_bytes: int
    kv_held_bytes: int | None


@dataclass(frozen=True)
class UncachedRow:
    context: int
    uncached_s: float  # one forward over `context` tokens (what an uncached step costs there)
    per_token_s: float  # uncached_s / context: flat while linear, growing once attention dominates
    attention_share: float  # attention FLOPs / all FLOPs of that forward (analysis.flops_per_token)


@dataclass
class SweepReport:
    preset: str
    engine: str
    device: str
    capacity_bytes: int | None  # total device memory
    free_bytes: int | None  # free before the sweep, weights loaded
    weight_bytes: int
    read_bandwidth_bytes_s: float  # a device-to-device copy: bytes read and written per second
    decode: list[DecodeRow] = field(default_factory=list)
    uncached: list[UncachedRow] = field(default_factory=list)
    quadratic_from: int = 0  # the context from which attention FLOPs exceed the rest (analysis)
    batch_1: dict[str, float] = field(default_factory=dict)  # seconds per token at batch 1, per path
    seconds: float = 0.0

    @property
    def weight_floor_s(self) -> float:
        """The time to read every weight once at the measured bandwidth: a decode step's lower bound."""
        return self.weight_bytes / self.read_bandwidth_bytes_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weight_floor_s"] = self.weight_floor_s
        return out


def run_sweep(sweep: Sweep, engine: str, note: Note, *, transformers: bool = True) -> SweepReport:
    """Measure ``sweep`` with the ``engine`` (eager or compiled) decode step; see the module docstring."""
    engines.check_engine(engine)
    began, config = time.perf_counter(), sweep.config
    device = torch.device(config.device)
    note(f"{sweep.name}: building the model ({weight_bytes(config) / 2**30:.1f} GiB of weights)")
    model = ReferenceModel(config)
    free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (None, None)
    report = SweepReport(sweep.name, engine, str(device), total, free, weight_bytes(config), _bandwidth(device))
    report.quadratic_from = _quadratic_from(model)
    for batch in sweep.batches:
        for context in sweep.contexts:
            note(f"{sweep.name}: decode, batch {batch}, context {context}")
            report.decode.append(_decode_row(model, engine, batch, context, sweep.steps, report))
    for context in sweep.contexts:
        note(f"{sweep.name}: uncached forward over {context} tokens")
        report.uncached.append(_uncached_row(model, context))
    note(f"{sweep.name}: batch 1 against transformers")
    report.batch_1 = _batch_1(model, transformers)
    report.seconds = time.perf_counter() - began
    return report


def _bandwidth(device: torch.device) -> float:
    size = (1 if device.type == "cuda" else 1 / 16) * 2**30
    source = torch.empty(int(size), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    samples = []
    for _ in range(5):
        timing.sync(device)
        begin = time.perf_counter()
        target.copy_(source)
        timing.sync(device)
        samples.append(time.perf_counter() - begin)
    return 2 * size / min(samples)


def _quadratic_from(model: ReferenceModel) -> int:
    c = model.config
    body = 2 * analysis.matmul_params(c) - 2 * c.d_model * c.vocab_size  # FLOPs per token outside attention
    return -(-body // (4 * c.n_layers * c.n_heads * c.head_dim))  # attention_flops(L, L) > L * body from here


def _decode_row(model: ReferenceModel, engine: str, batch: int, context: int, steps: int,
                report: SweepReport) -> DecodeRow:
    c, length = model.config, context + steps
    formula = analysis.kv_bytes(c, length, batch=batch)
    if report.free_bytes is not None and formula + HEADROOM_BYTES > report.free_bytes:
        return DecodeRow(batch, context, False, None, formula, None)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=c.device)
    decoder = CompiledDecoder(model, max_len=length, batch_size=batch) if engine == "compiled" else None
    eager = DecodeStep(model.weights(), max_len=length) if decoder is None else None
    cache = engines.generation_cache(model, batch, length) if decoder is None else decoder.cache

    def step(position: int) -> torch.Tensor:
        if decoder is not None:
            return decoder.decode(tokens, torch.full((1,), position, dtype=torch.long, device=c.device))
        assert eager is not None
        return eager(tokens, cache, position)

    with torch.no_grad():
        for _ in range(2):  # compile (twice: the cache's length counter is allocated by the first), capture
            step(context)
        samples = []
        for position in range(context, length):
            timing.sync(torch.device(c.device))
            begin = time.perf_counter()
            step(position)
            timing.sync(torch.device(c.device))
            samples.append(time.perf_counter() - begin)
    held = hostmem.held_bytes(cache)
    return DecodeRow(batch, context, True, statistics.median(samples), formula, held)


def _uncached_row(model: ReferenceModel, context: int) -> UncachedRow:
    tokens = torch.zeros(1, context, dtype=torch.long, device=model.config.device)
    step = timing.reference_step(model)
    seconds = timing.time_uncached(step, tokens, repeats=2)
    flops = analysis.flops_per_token(model.config, context)
    share = analysis.attention_flops(model.config, context, context) / flops.uncached
    return UncachedRow(context, seconds, seconds / context, share)


def _bound(factory: Any, config: Any) -> Callable[[], Any]:
    assert factory is not None, "a transformers cache of the registry has no target"
    return lambda: factory(config)


def _batch_1(model: ReferenceModel, transformers: bool, new: int = 32) -> dict[str, float]:
    """Seconds per token of a greedy loop at batch 1 after a prompt of 512 tokens (fewer in a short model), per
    path."""
    c = model.config
    prompt_len = min(512, c.max_seq_len - new - 8)
    prompt = torch.randint(0, c.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(c.device)
    length = prompt_len + new
    paths: dict[str, tuple[timing.StepFn, Callable[[], Any]]] = {
        "reference eager, static cache": (timing.reference_step(model), lambda: StaticCache.from_config(
            c.replace(max_seq_len=length, max_batch_size=1))),
        "reference compiled, static cache": (engines.compiled_step(model, length),
                                             lambda: engines.generation_cache(model, 1, length)),
    }
    if transformers:
        from kvverify.adapters.hf import CACHES
        from kvverify.adapters.hf.llama import to_llama

        llama, config = to_llama(model, attn_implementation="sdpa"), c.replace(max_seq_len=length, max_batch_size=1)
        for name in ("dynamic", "static"):
            paths[f"transformers {name} cache"] = (timing.llama_step(llama), _bound(CACHES[name].target, config))
    out = {}
    for name, (step, make) in paths.items():
        timing.greedy_seconds_per_token(step, make, prompt, new)  # warm-up: compile, capture
        out[name] = statistics.median(timing.greedy_seconds_per_token(step, make, prompt, new) for _ in range(3))
    return out
