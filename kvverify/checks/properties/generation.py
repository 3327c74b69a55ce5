"""Whole generations through the cache: cached ≡ uncached, and a generation continued from its cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import reject
from hypothesis import strategies as st

from kvverify.checks.boundaries import ENGINE_CHUNKS, near_marks
from kvverify.checks.case import Case
from kvverify.checks.eviction import check_evicted
from kvverify.checks.expected import expected_generation
from kvverify.checks.property import Property, expect_same, join, numerics_cases, random_tokens
from kvverify.checks.replay import check_replayed
from kvverify.checks.target import Target
from kvverify.engine.generation import generate


def check_cached_equals_uncached(target: Target, case: Case) -> None:
    if target.declaration.quantizer is not None:  # a lossy cache with its quantizer: the oracle replays it
        return check_replayed(target, case, target.declaration.quantizer)
    if target.declaration.keeps is not None:  # a compressing cache: the oracle attends to the tokens it kept
        return check_evicted(target, case, target.declaration.keeps)
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    cache = target.new_cache(case.config)
    actual = generate(model, prompt, case.max_new_tokens, cache=cache, attention_mask=mask)
    expected = expected_generation(model, prompt, case.max_new_tokens, mask, actual)
    expect_same(target, case, expected, actual, "cached generation differs from uncached", label="generation")


CACHED_EQUALS_UNCACHED = Property(
    name="cached_equals_uncached",
    summary=(
        "Greedy generation through the cache gives the same logits as recomputing the whole prefix every step "
        "(bit for bit in strict numerics): dropped, duplicated, stale or misplaced keys and values, wrong "
        "eviction, unmasked slots, wrong dtype or batch row."
    ),
    needs=frozenset(),
    strategy=numerics_cases,
    check=check_cached_equals_uncached,
)


@dataclass(frozen=True)
class Continuation:
    """Generate ``case.max_new_tokens`` tokens, append ``extra`` tokens per row (a new user turn; none is
    plain continued decoding), then generate ``more`` tokens from the returned cache."""

    case: Case
    extra: tuple[tuple[int, ...], ...]
    more: int

    def describe(self) -> str:
        return "\n".join(
            (self.case.describe(), f"then: {len(self.extra[0])} appended tokens per row {list(self.extra)}, "
             f"then {self.more} more tokens from the returned cache")
        )


@st.composite
def continuations(draw: st.DrawFn, target: Target) -> Continuation:
    # invariant: prompt + first + extra + more - 1 <= max_seq_len
    case = draw(numerics_cases(target), label="case")
    room = case.config.max_seq_len - case.total_len  # tokens left for extra + more
    if room < 1:  # the case fills the cache: split its generation in two instead
        first = draw(st.integers(1, max(1, case.max_new_tokens - 1)), label="first part")
        case = Case(case.config, case.prompt, case.pad, first, case.seed)
        room = case.config.max_seq_len - case.total_len
    if room < 1:
        reject()  # a prompt as long as the cache: nothing can follow it
    more = draw(st.integers(1, min(room, 12)), label="more tokens")
    # the second call feeds the last generated token and the appended ones as one update from total_len: often
    # one that ends next to a boundary (a multi-token append across a page or an allocation chunk)
    held = case.total_len
    across = [n - held - 1 for n in near_marks(case.config, held + 2, held + 1 + room - more,
                                               target.declaration.block_size)]
    # and just past an engine's allocation chunk (128, 256, 512) whenever one lies ahead
    last = held + 1 + room - more
    past_chunk = [m + d - held - 1 for m in ENGINE_CHUNKS for d in (1, 2) if held < m and m + d <= last]
    extra = draw(st.integers(0, min(room - more, 4)) | (st.sampled_from(across) if across else st.nothing())
                 | (st.sampled_from(past_chunk) if past_chunk else st.nothing()), label="appended tokens")
    tokens = random_tokens(draw, case.config, case.batch, extra, "appended tokens")
    return Continuation(case, tokens, more)


def check_continuation(target: Target, plan: Continuation) -> None:
    case = plan.case
    if target.declaration.keeps is not None:  # a compressing cache: the oracle follows it into the second call
        extra = torch.tensor(plan.extra, dtype=torch.long, device=case.config.device).reshape(case.batch, -1)
        return check_evicted(target, case, target.declaration.keeps, then=(extra, plan.more))
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    cache = target.new_cache(case.config)
    first = generate(model, prompt, case.max_new_tokens, cache=cache, attention_mask=mask)
    expected_first = expected_generation(model, prompt, case.max_new_tokens, mask, first)
    expect_same(target, case, expected_first, first, "first generation differs from uncached",
                label="first generation")
    extra = torch.tensor(plan.extra, dtype=torch.long, device=prompt.device).reshape(case.batch, -1)
    sequences = torch.cat((first.sequences, extra), dim=1)
    mask2 = torch.cat((first.attention_mask, torch.ones_like(extra)), dim=1)
    assert first.cache is not None
    second = generate(model, sequences, plan.more, cache=first.cache, attention_mask=mask2)
    expected_second = expected_generation(model, sequences, plan.more, mask2, second)
    expect_same(target, case, join(expected_first, expected_second), join(first, second),
                "generation continued from the returned cache differs from generating it at once",
                label="continued generation")


CONTINUATION = Property(
    name="continuation",
    summary=(
        "Generating n tokens, optionally appending a new turn, and continuing m more from the returned cache "
        "equals generating it all at once, with RoPE, learned and ALiBi positions and left padding: positions "
        "restarting or not derived from the mask, offsets advanced by the wrong count, state lost between calls."
    ),
    needs=frozenset(),
    strategy=continuations,
    check=check_continuation,
)
