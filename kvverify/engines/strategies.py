"""Hypothesis strategies for engine schedules: models with full, sliding and mixed layers; 1 to 16 requests whose
prompts share prefixes of whole and partial pages; arrivals while others decode; knobs tight enough to force
chunked prefill, queueing and preemption.

>>> from kvverify.engines.transformers_cb import TransformersEngine
>>> schedules(engine=TransformersEngine()).example()  # doctest: +SKIP
Schedule(model=ModelSpec(layers='full', ...), knobs=EngineKnobs(page_size=4, ...), requests=(...))
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil
from typing import TYPE_CHECKING

from hypothesis import strategies as st

from kvverify.engines.properties import NeighbourCase
from kvverify.engines.schedule import ATTENTIONS, EngineKnobs, ModelSpec, RequestSpec, Schedule

if TYPE_CHECKING:
    from kvverify.engines.adapter import EngineAdapter

#: Page sizes drawn: the engine's minimum of 4, an odd one, and larger powers of two.
PAGE_SIZES = (4, 5, 8, 16)
MAX_REQUESTS = 16
MAX_PROMPT = 300
MAX_NEW_TOKENS = 8


def _check(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"schedules(): {name} must be a whole number in [{low}, {high}]; got {value!r}")


@st.composite
def models(draw: st.DrawFn) -> ModelSpec:
    """A tiny model: full layers three times in five (the only kind the transformers engine shares blocks for)."""
    layers = draw(st.sampled_from(("full", "sliding", "full", "mixed", "full")), label="layers")
    window = None if layers == "full" else draw(st.integers(2, 24), label="window")
    attention = draw(st.sampled_from(ATTENTIONS), label="attention")
    return ModelSpec(layers=layers, window=window, attention=attention, seed=draw(st.integers(0, 1), label="seed"))


@st.composite
def prompts(draw: st.DrawFn, *, page_size: int, stems: list[tuple[int, ...]], vocab: int,
            max_prompt: int) -> tuple[int, ...]:
    """A prompt: fresh tokens, or a stem's prefix cut at a whole page, one token either side of a page boundary,
    or anywhere; then its own tail. Invariant: 1 <= length <= max_prompt."""
    short = st.integers(1, min(24, max_prompt))
    length = draw(st.one_of(short, short, st.integers(1, max_prompt)), label="prompt length")
    tokens = st.integers(0, vocab - 1)
    if not stems or draw(st.integers(0, 5), label="fresh prompt (0)") == 0:
        return tuple(draw(st.lists(tokens, min_size=length, max_size=length), label="prompt"))
    stem = draw(st.sampled_from(stems), label="stem")
    pages = draw(st.integers(min(1, len(stem) // page_size), len(stem) // page_size), label="shared pages")
    cut = draw(st.sampled_from((0, -1, 1, None)), label="cut around the page boundary")
    at = draw(st.integers(0, len(stem)), label="cut") if cut is None else pages * page_size + cut
    prefix = stem[: max(0, min(at, len(stem)))]
    tail = draw(st.lists(tokens, min_size=0 if prefix else 1, max_size=max(0, length - len(prefix))), label="tail")
    return (prefix + tuple(tail))[:max_prompt]


@st.composite
def schedules(draw: st.DrawFn, *, engine: EngineAdapter, max_requests: int = MAX_REQUESTS,
              max_prompt: int = MAX_PROMPT, max_new_tokens: int = MAX_NEW_TOKENS,
              model: ModelSpec | None = None) -> Schedule:
    """A schedule the engine can finish: ``num_blocks`` at least what its longest request needs alone (plus
    one page of slack), so a run can always end; block sharing only where ``engine`` allows it. ``model``: the
    model to use (default: drawn)."""
    _check("max_requests", max_requests, 1, 64)
    _check("max_prompt", max_prompt, 1, 4096)
    _check("max_new_tokens", max_new_tokens, 1, 256)
    model = draw(models(), label="model") if model is None else model
    page_size = draw(st.sampled_from(PAGE_SIZES), label="page_size")
    stem_tokens = st.lists(st.integers(0, model.vocab - 1), min_size=page_size, max_size=max(page_size, max_prompt))
    stems = [tuple(s) for s in draw(st.lists(stem_tokens, min_size=1, max_size=2), label="stems")]
    few = st.integers(min(2, max_requests), min(6, max_requests))  # neighbours, without the cost of sixteen
    count = draw(st.one_of(few, st.integers(1, max_requests)), label="requests")
    requests = []
    for _ in range(count):
        prompt = draw(prompts(page_size=page_size, stems=stems, vocab=model.vocab, max_prompt=max_prompt))
        # long generations outgrow their blocks while decoding: what makes the engine preempt
        new = draw(st.one_of(st.integers(1, max_new_tokens), st.integers(max(1, max_new_tokens // 2), max_new_tokens)),
                   label="max_new_tokens")
        arrival = draw(st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, 12)), label="arrival step")
        requests.append(RequestSpec(prompt, new, arrival))
    need = blocks_needed(requests, page_size)
    every = sum(ceil(r.total_len / page_size) for r in requests) + 1
    tight = st.integers(need, need + 2)  # preemption: the requests cannot all hold their blocks at once
    num_blocks = draw(st.one_of(tight, tight, tight, st.integers(need, need + 6),
                                st.integers(need, max(need, every)), st.integers(every, 2 * every)),
                      label="num_blocks")
    longest = max(len(r.prompt) for r in requests)
    max_batch_tokens = draw(st.one_of(st.integers(1, max(1, longest)), st.integers(1, 256)),
                            label="max_batch_tokens")
    sharing = engine.allows_sharing(model) and draw(st.sampled_from((True, True, False)), label="block_sharing")
    scheduler = draw(st.sampled_from(("fifo", "prefill_first")), label="scheduler")
    knobs = EngineKnobs(page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                        block_sharing=sharing, scheduler=scheduler)
    return Schedule(model, knobs, tuple(requests))


def blocks_needed(requests: list[RequestSpec] | tuple[RequestSpec, ...], page_size: int) -> int:
    """Blocks the longest request needs alone, with a page to spare: below it, no schedule could finish."""
    return max(ceil(r.total_len / page_size) for r in requests) + 1


@st.composite
def neighbour_cases(draw: st.DrawFn, *, engine: EngineAdapter, max_requests: int = MAX_REQUESTS) -> NeighbourCase:
    """One request of a drawn schedule, placed among the requests of a second schedule (same model, its own
    knobs, enough blocks for the request)."""
    first = draw(schedules(engine=engine, max_requests=max_requests), label="first schedule")
    second = draw(schedules(engine=engine, max_requests=max_requests, model=first.model), label="second schedule")
    index = draw(st.integers(0, len(first.requests) - 1), label="the request")
    at = draw(st.integers(0, len(second.requests)), label="its place in the second")
    moved = replace(first.requests[index], arrival=draw(st.integers(0, 12), label="its arrival in the second"))
    requests = (*second.requests[:at], moved, *second.requests[at:])
    knobs = replace(second.knobs, num_blocks=max(second.knobs.num_blocks,
                                                 blocks_needed(requests, second.knobs.page_size)))
    return NeighbourCase(first, Schedule(second.model, knobs, requests), index, at)
