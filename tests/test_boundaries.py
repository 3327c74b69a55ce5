"""Operations aimed at boundaries: crops keep whole pages, stateful programs reach a page or an allocation chunk
before a fork, reorder, reset or crop, and multi-token appends straddle 128, 256 and 512 in the default shapes."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvverify import CacheDeclaration, ModelConfig
from kvverify.caches import ContiguousCache
from kvverify.caches._common import resolve_crop
from kvverify.suite import make_target
from kvverify.suite.boundaries import marks, near_marks
from kvverify.suite.case import build_model
from kvverify.suite.properties.generation import Continuation, continuations
from kvverify.suite.properties.prefill import Chunked, chunked_plans
from kvverify.suite.properties.rollback import CropPlan, crop_plans
from kvverify.suite.properties.session import Session
from kvverify.suite.properties.stateful import Program, _length_after, apply, programs
from kvverify.suite.target import Target

QUICK = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _target(**declared: Any) -> Target:
    def factory(config: ModelConfig) -> ContiguousCache:
        return ContiguousCache()

    factory.kvverify_declaration = CacheDeclaration(**declared)  # type: ignore[attr-defined]
    return make_target(factory, "contiguous, declared")


def _collect(strategy: st.SearchStrategy[Any], count: int = 150) -> list[Any]:
    seen: list[Any] = []

    @settings(QUICK, max_examples=count)
    @given(strategy)
    def run(value: Any) -> None:
        seen.append(value)

    run()
    return seen


def test_marks_are_pages_chunks_windows_and_the_end() -> None:
    config = ModelConfig(max_seq_len=300, sliding_window=5)
    assert marks(config) == [5, 10, 15, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 272,
                             288, 300], marks(config)
    assert marks(config, block_size=100) == [5, 10, 15, 100, 128, 200, 256, 300], marks(config, 100)
    assert near_marks(config, 126, 130, block_size=100) == [127, 128, 129], near_marks(config, 126, 130, 100)


def test_crops_keep_whole_pages_far_more_often_than_uniform_draws() -> None:
    plans: list[CropPlan] = _collect(crop_plans(_target(block_size=16)), 300)
    # distinct (held, kept) pairs past a page, crop(0) aside: Hypothesis repeats and mutates its examples
    kept = {(p.held, k) for p in plans if p.held > 16 and (k := resolve_crop(p.argument, p.held))}
    pages = [k for _, k in kept if k % 16 == 0]
    near = [k for _, k in kept if k % 16 in (15, 0, 1)]
    assert len(kept) >= 30, f"only {len(kept)} distinct crops of more than a page in {len(plans)} plans"
    # uniform draws over [1, held] keep a whole page about 1 in 16 times, one next to a page 3 in 16
    assert len(pages) >= len(kept) / 10, f"{len(pages)} of {len(kept)} crops kept whole pages: {sorted(kept)}"
    assert len(near) >= 0.35 * len(kept), f"{len(near)} of {len(kept)} crops kept a page, or one off: {sorted(kept)}"


def test_programs_reach_a_boundary_before_destructive_operations_and_track_lengths() -> None:
    target = _target(block_size=16, max_seq_len=72)
    drawn: list[Program] = _collect(programs(target), 20)
    before = Counter()
    for program in drawn[:8]:  # run them: the simulated lengths must be what the session holds
        case = program.case
        session = Session(target, build_model(case.config, case.seed), case.batch)
        session.append(case.tokens(), case.attention_mask())
        length = session.length
        for operation in program.operations:
            if operation.kind != "append":
                before[length % 16 in (0, 1, 15)] += 1
            assert apply(session, operation), "the contiguous cache refuses no crop"
            length = _length_after(operation, length, case.config)
            assert session.length == length, f"after {operation}: held {session.length}, simulated {length}"
    assert before[True] >= before[False] / 2, f"destructive operations next to a page boundary: {before}"


def test_default_shapes_append_across_128_256_and_512() -> None:
    crossed: Counter[int] = Counter()
    for plan in _collect(continuations(_target()), 200):
        assert isinstance(plan, Continuation)
        start, count = plan.case.total_len, 1 + len(plan.extra[0])
        crossed.update(m for m in (128, 256, 512) if start < m < start + count)
    for plan in _collect(chunked_plans(_target()), 200):
        assert isinstance(plan, Chunked)
        edges = [0]
        for size in plan.chunks:
            edges.append(edges[-1] + size)
        spans = [*itertools.pairwise(edges), (edges[-1], plan.case.prompt_len)]
        crossed.update(m for m in (128, 256, 512) for a, b in spans if 0 < a < m < b)
    assert all(crossed[m] >= 1 for m in (128, 256, 512)), f"multi-token appends across each chunk: {crossed}"
