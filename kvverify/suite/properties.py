"""The properties a KV cache must keep, each a strategy of cases and a check that raises on a violation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis import target as hypothesis_target
from hypothesis.control import currently_in_test_context

from kvverify.case import Case
from kvverify.compare import GenerationMismatch, first_difference
from kvverify.model import Generation
from kvverify.strategies import cases
from kvverify.suite.target import Target


@dataclass(frozen=True)
class Property:
    """name: a test-id-friendly name; summary: one sentence, with the bug classes it catches;
    needs: optional cache methods it uses (skipped, with the reason, when the target lacks one)."""

    name: str
    summary: str
    needs: frozenset[str]
    strategy: Callable[[Target], st.SearchStrategy[Any]]
    check: Callable[[Target, Any], None]


def expect_same(target: Target, case: Case, expected: Generation, actual: Generation, what: str) -> None:
    """Compare bit for bit, or within the target's tolerance; steer Hypothesis toward larger errors."""
    tolerance = target.tolerance(case.config)
    mismatch = first_difference(expected, actual, tolerance)
    if tolerance is not None and currently_in_test_context():
        error = float((expected.logits.double() - actual.logits.double()).abs().nan_to_num(1e30).max())
        hypothesis_target(error, label="max abs logit error")
    if mismatch is not None:
        raise GenerationMismatch(mismatch, f"{what}: ")


def _numerics_cases(target: Target) -> st.SearchStrategy[Case]:
    """Strict numerics in float32/float64 three times in four; fast numerics in any dtype otherwise."""
    strict = cases(dtype=("float32", "float64"), numerics="strict", **target.config_constraints())
    fast = cases(dtype=("float32", "float64", "bfloat16", "float16"), numerics="fast", **target.config_constraints())
    return st.one_of(strict, strict, strict, fast)


def check_cached_equals_uncached(target: Target, case: Case) -> None:
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    expected = model.generate(prompt, case.max_new_tokens, use_cache=False, attention_mask=mask)
    cache = target.new_cache(case.config)
    actual = model.generate(prompt, case.max_new_tokens, cache=cache, attention_mask=mask)
    expect_same(target, case, expected, actual, "cached generation differs from uncached")


CACHED_EQUALS_UNCACHED = Property(
    name="cached_equals_uncached",
    summary=(
        "Greedy generation through the cache gives the same logits as recomputing the whole prefix every step "
        "(bit for bit in strict numerics): dropped, duplicated, stale or misplaced keys and values, wrong "
        "eviction, unmasked slots, wrong dtype or batch row."
    ),
    needs=frozenset(),
    strategy=_numerics_cases,
    check=check_cached_equals_uncached,
)

PROPERTIES: dict[str, Property] = {p.name: p for p in (CACHED_EQUALS_UNCACHED,)}
