"""Prompts fed in chunks (chunked prefill, speculative decoding), and sliding windows at their boundaries."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from hypothesis import reject
from hypothesis import strategies as st

from kvverify.checks.boundaries import DEFAULT_BLOCKS, ENGINE_CHUNKS, aimed, near_marks
from kvverify.checks.case import Case
from kvverify.checks.expected import expected_generation
from kvverify.checks.property import (
    Property,
    as_generation,
    expect_length,
    expect_same,
    expect_same_for,
    numerics_cases,
)
from kvverify.checks.target import Target
from kvverify.engine.generation import generate


@dataclass(frozen=True)
class Chunked:
    """Feed the first ``sum(chunks)`` prompt tokens in chunks of these sizes, then generate: the rest of the
    prompt goes in as one more multi-token update, then one token per step."""

    case: Case
    chunks: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.case.describe()}\nprompt fed in chunks of {list(self.chunks)}, then the rest at once"


def _split(draw: st.DrawFn, total: int, favoured: list[int]) -> tuple[int, ...]:
    """Chunk sizes summing to ``total``: token by token, or cut at random points (``favoured`` ones often)."""
    if 1 < total <= 64 and draw(st.integers(0, 4), label="token by token when 0") == 0:  # longer: slow
        return (1,) * total
    inner = list(range(1, total))
    if not inner:
        return (total,)
    points = st.sampled_from(inner)
    if favoured:
        points = st.sampled_from(favoured) | points
    cuts = sorted(draw(st.sets(points, max_size=4), label="chunk boundaries"))
    edges = [0, *cuts, total]
    return tuple(b - a for a, b in itertools.pairwise(edges))


@st.composite
def chunked_plans(draw: st.DrawFn, target: Target) -> Chunked:
    # invariant: the chunks leave at least the last prompt token for generate()
    # prompts mostly short, some just past a page or an allocation chunk (capped by the buffer); chunk edges
    # and the end of the chunked part often next to a boundary, so that the next update straddles it
    length = st.integers(2, 16) | st.sampled_from([n + d for n in (*DEFAULT_BLOCKS, *ENGINE_CHUNKS) for d in (1, 2)])
    case = draw(numerics_cases(target, prompt_length=length), label="case")
    if case.prompt_len < 2:
        reject()  # the buffer holds a single token: nothing to chunk
    block = target.declaration.block_size
    fed = draw(aimed(case.config, 1, case.prompt_len - 1, block), label="prompt tokens fed in chunks")
    return Chunked(case, _split(draw, fed, near_marks(case.config, 1, fed - 1, block)))


@st.composite
def window_plans(draw: st.DrawFn, target: Target) -> Chunked:
    # invariant: a window W; prompts and chunk edges often at W-1, W, W+1 and multiples of W
    window = target.declaration.sliding_window or draw(st.integers(1, 8), label="window")
    near = sorted({n for w in (window, 2 * window, 3 * window) for n in (w - 1, w, w + 1) if 2 <= n <= 24})
    length = st.integers(2, min(24, 3 * window + 2))
    if near:
        length = st.sampled_from(near) | length
    case = draw(numerics_cases(target, sliding_window=window, prompt_length=length), label="case")
    if case.prompt_len < 2:
        return Chunked(case, ())
    fed = draw(st.integers(1, case.prompt_len - 1), label="prompt tokens fed in chunks")
    return Chunked(case, _split(draw, fed, [n for n in near if n < fed]))


def check_chunked(target: Target, plan: Chunked) -> None:
    case = plan.case
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    cache = target.new_cache(case.config)
    start, logits = 0, []
    for size in plan.chunks:
        end = start + size
        logits.append(model(prompt[:, start:end], cache=cache, start=start, attention_mask=mask[:, :end]))
        start = end
    if plan.chunks:
        expect_length(cache, start, f"after feeding chunks {list(plan.chunks)}")
        whole = model(prompt[:, :start], attention_mask=mask[:, :start])
        expect_same_for(target, case.config, as_generation(whole), as_generation(torch.cat(logits, dim=1)),
                        f"prompt logits fed in chunks {list(plan.chunks)} differ from a one-shot uncached prefill",
                        label="prompt logits in chunks")
    actual = generate(model, prompt, case.max_new_tokens, cache=cache, attention_mask=mask)
    expected = expected_generation(model, prompt, case.max_new_tokens, mask, actual)
    expect_same(target, case, expected, actual, f"generation after a prefill in chunks {list(plan.chunks)} differs",
                label="generation after the chunks")


CHUNKED_PREFILL = Property(
    name="chunked_prefill",
    summary=(
        "A prompt fed in random chunks or token by token (multi-token updates on a non-empty cache, as chunked "
        "prefill and speculative decoding do) gives the logits of a one-shot prefill: writes at the wrong "
        "offset, lengths advanced by the wrong count, chunks sliced or masked wrongly."
    ),
    needs=frozenset(),
    strategy=chunked_plans,
    check=check_chunked,
)

SLIDING_WINDOW = Property(
    name="sliding_window",
    summary=(
        "With a window W, cached ≡ uncached windowed attention at every length, weighted to W-1, W, W+1 and "
        "multiples of W, prompts longer than W and chunks crossing W: early or late eviction, a ring start "
        "index wrong while under-full, a window off by one, chunks past the window losing keys."
    ),
    needs=frozenset(),
    strategy=window_plans,
    check=check_chunked,
)
