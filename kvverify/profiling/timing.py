"""Wall-clock time of prefill and of one decode step, cached and uncached, and side-by-side ratios.

A *step function* maps ``(tokens (B, T), cache or None, start)`` to the last position's logits (B, vocab);
the reference model and transformers' ``LlamaForCausalLM`` each get one, so both are timed the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.adapters.hf.generation import cache_keyword, last_logits, library_generate
from kvverify.engine.decode import DecodeStep, supports
from kvverify.engine.generation import generate
from kvverify.reference.model import ReferenceModel

StepFn = Callable[[torch.Tensor, Any, int], torch.Tensor]


def reference_step(model: ReferenceModel) -> StepFn:
    """The reference model's step: ``start`` is the slot of the first new token. One cached token runs the decode
    engine (in fast numerics, as ``generate`` does), built here from the model's weights; the rest, its forward."""
    engine = DecodeStep(model.weights()) if supports(model.config) else None

    @torch.no_grad()
    def step(tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        if engine is not None and cache is not None and tokens.shape[1] == 1 and start < engine.max_len:
            return engine(tokens, cache, start)
        logits: torch.Tensor = model(tokens, cache=cache, start=start, last_only=True)[:, -1]
        return logits

    return step


def llama_step(llama: Any) -> StepFn:
    """transformers' step: the cache knows where new tokens go, so ``start`` is not passed."""
    keyword = cache_keyword(llama)

    def step(tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        return last_logits(llama, tokens, cache, keyword)

    return step


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_sync = sync


@dataclass(frozen=True)
class CachedTiming:
    prefill_s: float  # one forward over the `context` prompt tokens, filling the cache
    step_s: float  # median of the decode steps that follow (one token each)


def time_cached(step: StepFn, cache: Any, tokens: torch.Tensor, context: int) -> CachedTiming:
    """Prefill ``tokens[:, :context]`` into ``cache``, then decode the remaining columns one at a time.

    tokens: (B, context + steps) with steps >= 1.
    """
    steps = tokens.shape[1] - context
    if context < 1 or steps < 1:
        raise ValueError(f"need a context >= 1 and at least one step; got context={context}, tokens={tokens.shape[1]}.")
    _sync(tokens.device)
    begin = time.perf_counter()
    step(tokens[:, :context], cache, 0)
    _sync(tokens.device)
    prefill = time.perf_counter() - begin
    samples = []
    for position in range(context, context + steps):
        begin = time.perf_counter()
        step(tokens[:, position : position + 1], cache, position)
        _sync(tokens.device)
        samples.append(time.perf_counter() - begin)
    return CachedTiming(prefill_s=prefill, step_s=statistics.median(samples))


def time_uncached(step: StepFn, tokens: torch.Tensor, repeats: int) -> float:
    """Median time of a forward over all of ``tokens`` (B, T): the work of one uncached decode step at length T.

    One untimed forward first: the first call at a new shape pays one-off costs (packed weights, tables,
    allocator growth) that are not the step's.
    """
    step(tokens, None, 0)
    samples = []
    for _ in range(repeats):
        _sync(tokens.device)
        begin = time.perf_counter()
        step(tokens, None, 0)
        _sync(tokens.device)
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def greedy_seconds_per_token(
    step: StepFn, make_cache: Callable[[], Any], prompt: torch.Tensor, new_tokens: int
) -> float:
    """Seconds per generated token of a greedy generation with a fresh cache: prefill, then one token per step."""
    cache = make_cache()
    _sync(prompt.device)
    begin = time.perf_counter()
    logits = step(prompt, cache, 0)
    position = prompt.shape[1]
    for _ in range(new_tokens - 1):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        logits = step(token, cache, position)
        position += 1
    _sync(prompt.device)
    return (time.perf_counter() - begin) / new_tokens


def generate_seconds_per_token(
    generate: Callable[[Any], torch.Tensor], make_cache: Callable[[], Any], new_tokens: int
) -> float:
    """Seconds per token of one call ``generate(cache) -> sequences`` that produces ``new_tokens`` tokens into a
    fresh cache: a library's own generation loop (``ReferenceModel.generate``, transformers' ``generate``),
    prefill included."""
    cache = make_cache()
    begin = time.perf_counter()
    sequences = generate(cache)
    _sync(sequences.device)
    return (time.perf_counter() - begin) / new_tokens


@dataclass(frozen=True)
class Ratio:
    """Two timings measured alternately in one process: ``ratio`` is the median of per-round first/second."""

    first_s: tuple[float, ...]
    second_s: tuple[float, ...]

    @property
    def ratio(self) -> float:
        return statistics.median(a / b for a, b in zip(self.first_s, self.second_s, strict=True))

    @property
    def first_median_s(self) -> float:
        return statistics.median(self.first_s)

    @property
    def second_median_s(self) -> float:
        return statistics.median(self.second_s)


def forward_ratio(
    model: ReferenceModel,
    llama: Any,
    make_ours: Callable[[], Any],
    make_theirs: Callable[[], Any],
    prompt: torch.Tensor,
    new_tokens: int,
    rounds: int,
) -> Ratio:
    """The reference (first) against ``LlamaForCausalLM`` (second), one greedy loop driving both forwards, each
    with a fresh cache of its own per round."""
    ours, theirs = reference_step(model), llama_step(llama)
    return alternating(
        lambda: greedy_seconds_per_token(ours, make_ours, prompt, new_tokens),
        lambda: greedy_seconds_per_token(theirs, make_theirs, prompt, new_tokens),
        rounds,
    )


def generate_ratio(
    model: ReferenceModel,
    llama: Any,
    make_ours: Callable[[], Any],
    make_theirs: Callable[[], Any],
    prompt: torch.Tensor,
    new_tokens: int,
    rounds: int,
) -> Ratio | None:
    """``ReferenceModel.generate`` (first) against ``LlamaForCausalLM.generate`` (second), or None when the two
    choose different tokens: their timings would then not be of the same work."""
    keyword = cache_keyword(llama)

    def ours(cache: Any) -> torch.Tensor:
        return generate(model, prompt, new_tokens, cache=cache).sequences

    def theirs(cache: Any) -> torch.Tensor:
        return library_generate(llama, prompt, new_tokens, cache, keyword)

    if not torch.equal(ours(make_ours()), theirs(make_theirs())):
        return None
    return alternating(
        lambda: generate_seconds_per_token(ours, make_ours, new_tokens),
        lambda: generate_seconds_per_token(theirs, make_theirs, new_tokens),
        rounds,
    )


def alternating(first: Callable[[], float], second: Callable[[], float], rounds: int) -> Ratio:
    """Run ``first`` and ``second`` in turn (one warm-up each, then ``rounds`` rounds); each returns seconds."""
    first()
    second()
    a, b = [], []
    for _ in range(rounds):
        a.append(first())
        b.append(second())
    return Ratio(first_s=tuple(a), second_s=tuple(b))
