"""Rolling a cache back (crop) and reordering its rows (beam search), then continuing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import reject
from hypothesis import strategies as st

from kvverify.checks.boundaries import at_marks
from kvverify.checks.case import Case
from kvverify.checks.cropping import CROP_REFUSALS, crop_argument, crop_convention
from kvverify.checks.expected import expected_generation
from kvverify.checks.property import (
    Property,
    expect_length,
    expect_same,
    numerics_cases,
    random_tokens,
    tensor,
    with_room,
)
from kvverify.checks.target import Target
from kvverify.engine.generation import generate
from kvverify.protocol.cache import resolve_crop


@dataclass(frozen=True)
class CropPlan:
    """Generate, feed the last generated token and ``draft`` tokens as one update, ``crop(argument)``, then
    generate ``more`` tokens after the kept tokens and ``then``."""

    case: Case
    draft: tuple[tuple[int, ...], ...]
    argument: int
    then: tuple[tuple[int, ...], ...]
    more: int

    @property
    def held(self) -> int:
        return self.case.total_len + 1 + len(self.draft[0])

    def describe(self) -> str:
        return (f"{self.case.describe()}\nthen: {len(self.draft[0])} draft tokens appended ({self.held} held), "
                f"crop({self.argument}), {len(self.then[0])} new tokens per row, {self.more} more generated")


@st.composite
def crop_plans(draw: st.DrawFn, target: Target) -> CropPlan:
    # invariant: held <= max_seq_len; kept + new + more - 1 <= max_seq_len
    case = with_room(draw(numerics_cases(target), label="case"), 1)
    if case is None:
        reject()
    cfg = case.config
    drafts = draw(st.integers(0, min(4, cfg.max_seq_len - case.total_len - 1)), label="draft tokens")
    draft = random_tokens(draw, cfg, case.batch, drafts, "draft tokens")
    held = case.total_len + 1 + drafts
    keeping = at_marks(cfg, 0, held, target.declaration.block_size)  # whole pages, chunks, windows, one off
    dropping = at_marks(cfg, 0, held - 1, target.declaration.block_size).map(lambda k: k - held)  # as a drop
    argument = draw(
        st.just(0)
        | st.integers(case.total_len, held)  # reject some drafts
        | st.integers(0, held)
        | st.integers(-(2 * held + 1), -1)  # negative, also past the start
        | keeping
        | keeping
        | keeping
        | dropping,
        label="crop argument",
    )
    kept = resolve_crop(argument, held)
    if cfg.max_seq_len - kept < 1:
        reject()
    count = draw(st.integers(1, min(3, cfg.max_seq_len - kept)), label="new tokens after the crop")
    more = draw(st.integers(1, min(6, cfg.max_seq_len - kept - count + 1)), label="more tokens")
    return CropPlan(case, draft, argument, random_tokens(draw, cfg, case.batch, count, "new tokens"), more)


def check_crop(target: Target, plan: CropPlan) -> None:
    case = plan.case
    model = case.model()
    cache = target.new_cache(case.config)
    first = generate(model, case.tokens(), case.max_new_tokens, cache=cache, attention_mask=case.attention_mask())
    fed = case.total_len
    draft = tensor(plan.draft, first.sequences)
    full = torch.cat((first.sequences, draft), dim=1)
    full_mask = torch.cat((first.attention_mask, torch.ones_like(draft)), dim=1)
    model(full[:, fed:], cache=cache, start=fed, attention_mask=full_mask)
    expect_length(cache, plan.held, f"after appending {full.shape[1] - fed} tokens to {fed}")
    convention = crop_convention(cache)
    argument = crop_argument(convention, plan.argument, plan.held)
    try:
        cache.crop(argument)  # type: ignore[attr-defined]
    except CROP_REFUSALS:  # a cache may refuse a crop it cannot do; it must then be as it was
        kept, what = plan.held, f"after a refused crop({argument}) of {plan.held} tokens"
    else:
        kept, what = resolve_crop(plan.argument, plan.held), f"after crop({argument}) of {plan.held} tokens"
    expect_length(cache, kept, what)
    room = case.config.max_seq_len - kept  # a refused crop keeps the drafts: continue with what still fits
    if room < 1:
        reject()
    then = tensor(plan.then, full)[:, :room]
    more = min(plan.more, room - then.shape[1] + 1)
    prompt = torch.cat((full[:, :kept], then), dim=1)
    mask = torch.cat((full_mask[:, :kept], torch.ones_like(then)), dim=1)
    actual = generate(model, prompt, more, cache=cache, attention_mask=mask)
    expected = expected_generation(model, prompt, more, mask, actual)
    expect_same(target, case, expected, actual, f"{what} (to {kept}), continuing differs from never appending",
                label="continued after the crop")


CROP = Property(
    name="crop",
    summary=(
        "Appending draft tokens, cropping back (crop(k), crop(0), crop(-k) past the start) and continuing "
        "equals never having appended; a cache may refuse (ValueError, RuntimeError) if it is left as it was: "
        "stale or rejected tokens kept, "
        "crop(0) ignored, negative arguments not clamped, some layers or blocks not cropped."
    ),
    needs=frozenset({"crop"}),
    strategy=crop_plans,
    check=check_crop,
)


@dataclass(frozen=True)
class ReorderPlan:
    """Generate, ``reorder_cache(beam_idx)``, then feed different ``fork`` tokens per row and generate ``more``."""

    case: Case
    beam_idx: tuple[int, ...]
    fork: tuple[tuple[int, ...], ...]
    more: int

    def describe(self) -> str:
        return (f"{self.case.describe()}\nthen: reorder_cache({list(self.beam_idx)}), fork tokens "
                f"{list(self.fork)}, {self.more} more generated")


@st.composite
def reorder_plans(draw: st.DrawFn, target: Target) -> ReorderPlan:
    # invariant: held + fork + more - 1 <= max_seq_len
    most = target.declaration.max_batch_size or 4
    batch = st.integers(2, most) if most >= 2 else st.just(1)
    case = with_room(draw(numerics_cases(target, batch_size=batch), label="case"), 1)
    if case is None:
        reject()
    rows = range(case.batch)
    beam = draw(st.permutations(list(rows)) | st.lists(st.sampled_from(list(rows)), min_size=case.batch,
                                                       max_size=case.batch), label="beam_idx")
    room = case.config.max_seq_len - case.total_len
    count = draw(st.integers(1, min(3, room)), label="fork tokens")
    more = draw(st.integers(1, min(6, room - count + 1)), label="more tokens")
    fork = random_tokens(draw, case.config, case.batch, count, "fork tokens")
    return ReorderPlan(case, tuple(beam), fork, more)


def check_reorder(target: Target, plan: ReorderPlan) -> None:
    case = plan.case
    model = case.model()
    cache = target.new_cache(case.config)
    first = generate(model, case.tokens(), case.max_new_tokens, cache=cache, attention_mask=case.attention_mask())
    held = case.total_len
    index = torch.tensor(plan.beam_idx, dtype=torch.long, device=first.sequences.device)
    cache.reorder_cache(index)  # type: ignore[attr-defined]
    expect_length(cache, held, f"after reorder_cache({list(plan.beam_idx)})")
    fork = tensor(plan.fork, first.sequences)
    prompt = torch.cat((first.sequences[index, :held], fork), dim=1)
    mask = torch.cat((first.attention_mask[index, :held], torch.ones_like(fork)), dim=1)
    actual = generate(model, prompt, plan.more, cache=cache, attention_mask=mask)
    expected = expected_generation(model, prompt, plan.more, mask, actual)
    expect_same(target, case, expected, actual,
                f"after reorder_cache({list(plan.beam_idx)}), continuing differs from caches built for those rows",
                label="continued after the reorder")


REORDER = Property(
    name="reorder",
    summary=(
        "reorder_cache(beam_idx) with permutations and duplicated rows, then different tokens per row, equals "
        "caches built for the reordered rows from scratch: reorders never applied, applied on the wrong axis "
        "or to part of the state, duplicated beams sharing storage."
    ),
    needs=frozenset({"reorder_cache"}),
    strategy=reorder_plans,
    check=check_reorder,
)
