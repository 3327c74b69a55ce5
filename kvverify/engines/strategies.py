"""Hypothesis strategies for engine schedules, within the engine's :class:`~kvverify.engines.schedule.ScheduleSpace`
(transformers' by default): models with full, sliding and mixed layers; 1 to 16 requests whose prompts share
prefixes of whole and partial pages; arrivals while others decode; knobs tight enough to force chunked prefill,
queueing and preemption.

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
from kvverify.engines.schedule import EngineKnobs, ModelSpec, RequestSpec, Schedule, ScheduleSpace

if TYPE_CHECKING:
    from kvverify.engines.adapter import EngineAdapter


def _check(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"schedules(): {name} must be a whole number in [{low}, {high}]; got {value!r}")


#: The default space: transformers' continuous batching.
DEFAULT_SPACE = ScheduleSpace()


@st.composite
def models(draw: st.DrawFn, space: ScheduleSpace = DEFAULT_SPACE) -> ModelSpec:
    """A tiny model of ``space``: by default full layers three times in five (the only kind the transformers
    engine shares blocks for)."""
    layers = draw(st.sampled_from(space.layers), label="layers")
    window = None if layers == "full" else draw(st.integers(2, 24), label="window")
    attention = draw(st.sampled_from(space.attentions), label="attention")
    seed = draw(st.integers(0, space.weight_seeds - 1), label="seed")
    return ModelSpec(layers=layers, window=window, attention=attention, seed=seed, vocab=space.vocab)


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
def schedules(draw: st.DrawFn, *, engine: EngineAdapter, max_requests: int | None = None,
              max_prompt: int | None = None, max_new_tokens: int | None = None,
              model: ModelSpec | None = None) -> Schedule:
    """A schedule the engine can finish, within ``engine.space`` (``max_requests``, ``max_prompt`` and
    ``max_new_tokens`` in place of the space's when given): ``num_blocks`` at least what its longest request
    needs alone (plus one page of slack), so a run can always end; block sharing only where ``engine`` allows
    it. ``model``: the model to use (default: drawn)."""
    space = engine.space
    max_requests = space.max_requests if max_requests is None else max_requests
    max_prompt = space.max_prompt if max_prompt is None else max_prompt
    max_new_tokens = space.max_new_tokens if max_new_tokens is None else max_new_tokens
    _check("max_requests", max_requests, 1, 64)
    _check("max_prompt", max_prompt, 1, 4096)
    _check("max_new_tokens", max_new_tokens, 1, 256)
    model = draw(models(space), label="model") if model is None else model
    page_size = draw(st.sampled_from(space.page_sizes), label="page_size")
    stem_tokens = st.lists(st.integers(0, model.vocab - 1), min_size=page_size, max_size=max(page_size, max_prompt))
    stems = [tuple(s) for s in draw(st.lists(stem_tokens, min_size=1, max_size=2), label="stems")]
    few = st.integers(min(2, max_requests), min(6, max_requests))  # neighbours, without the cost of sixteen
    count = draw(st.one_of(few, st.integers(1, max_requests)), label="requests")
    requests = []
    for _ in range(count):
        prompt = draw(prompts(page_size=page_size, stems=stems, vocab=model.vocab, max_prompt=max_prompt))
        if space.near_boundary and draw(st.booleans(), label="ends near a page boundary"):
            prompt = draw(near_boundary(prompt, page_size=page_size, vocab=model.vocab, max_prompt=max_prompt))
        # long generations outgrow their blocks while decoding: what makes the engine preempt
        new = draw(st.one_of(st.integers(1, max_new_tokens), st.integers(max(1, max_new_tokens // 2), max_new_tokens)),
                   label="max_new_tokens")
        arrival = draw(st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, space.max_arrival)),
                       label="arrival step")
        requests.append(RequestSpec(prompt, new, arrival))
    need = blocks_needed(requests, page_size)
    every = sum(ceil(r.total_len / page_size) for r in requests) + 1
    tight = st.integers(need, need + 2)  # preemption: the requests cannot all hold their blocks at once
    num_blocks = draw(st.one_of(tight, tight, tight, st.integers(need, need + 6),
                                st.integers(need, max(need, every)), st.integers(every, 2 * every)),
                      label="num_blocks")
    longest = max(len(r.prompt) for r in requests)
    low, high = space.min_batch_tokens, space.max_batch_tokens
    max_batch_tokens = draw(st.one_of(st.integers(low, max(low, longest)), st.integers(low, high)),
                            label="max_batch_tokens")
    sharing = engine.allows_sharing(model) and draw(st.sampled_from((True, True, False)), label="block_sharing")
    scheduler = draw(st.sampled_from(space.schedulers), label="scheduler")
    running = None
    if space.max_running:  # at most the budget: every running request gets a token of it each step
        running = min(draw(st.sampled_from(space.max_running), label="max_running"), max_batch_tokens)
    knobs = EngineKnobs(page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                        block_sharing=sharing, scheduler=scheduler, max_running=running)
    return Schedule(model, knobs, tuple(requests))


@st.composite
def near_boundary(draw: st.DrawFn, prompt: tuple[int, ...], *, page_size: int, vocab: int,
                  max_prompt: int) -> tuple[int, ...]:
    """``prompt`` cut or extended (fresh tokens) to end 0 to 2 tokens short of the end of its last page (of the
    page before, past ``max_prompt``): its first decodes need a new block. Invariant: 1 <= length <= max_prompt."""
    end = ceil(len(prompt) / page_size) * page_size
    if end > max_prompt:
        end -= page_size
    length = max(1, end - draw(st.integers(0, 2), label="short of the boundary by"))
    extra = max(0, length - len(prompt))
    tail = draw(st.lists(st.integers(0, vocab - 1), min_size=extra, max_size=extra), label="tokens to the boundary")
    return (prompt + tuple(tail))[:length]


def blocks_needed(requests: list[RequestSpec] | tuple[RequestSpec, ...], page_size: int) -> int:
    """Blocks the longest request needs alone, with a page to spare: below it, no schedule could finish."""
    return max(ceil(r.total_len / page_size) for r in requests) + 1


@st.composite
def neighbour_cases(draw: st.DrawFn, *, engine: EngineAdapter, max_requests: int | None = None) -> NeighbourCase:
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
