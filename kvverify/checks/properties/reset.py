"""A reset cache behaves as new: nothing of one sequence leaks into the next."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from kvverify.checks.case import Case
from kvverify.checks.expected import expected_generation
from kvverify.checks.property import Property, expect_length, expect_same, numerics_cases
from kvverify.checks.strategies import generation_lengths, prompts
from kvverify.checks.target import Target
from kvverify.engine.generation import generate


@dataclass(frozen=True)
class ResetPlan:
    """Generate ``first`` through a cache, ``reset()`` it, then generate ``second`` (usually longer)."""

    first: Case
    second: Case

    def describe(self) -> str:
        second = "\n".join("  " + line for line in self.second.describe().splitlines()[2:])
        return f"{self.first.describe()}\nthen reset() and a second sequence through the same cache:\n{second}"


@st.composite
def reset_plans(draw: st.DrawFn, target: Target) -> ResetPlan:
    # invariant: both cases share the config, weights and batch size (a static cache may keep its batch
    # across reset, as transformers' StaticCache does); the second prompt is longer than the first
    first = draw(numerics_cases(target), label="first case")
    cfg = first.config
    longest = min(cfg.max_seq_len, 16)
    length = st.integers(min(first.prompt_len + 1, longest), longest)
    rows, pads = draw(prompts(cfg, batch_size=first.batch, length=length), label="second prompt")
    new = draw(generation_lengths(cfg, len(rows[0])), label="second max_new_tokens")
    return ResetPlan(first, Case(cfg, rows, pads, new, first.seed))


def check_reset(target: Target, plan: ResetPlan) -> None:
    model = plan.first.model()
    cache = target.new_cache(plan.first.config)
    generate(model, plan.first.tokens(), plan.first.max_new_tokens, cache=cache,
                   attention_mask=plan.first.attention_mask())
    cache.reset()  # type: ignore[attr-defined]
    expect_length(cache, 0, f"after reset() of a cache that held {plan.first.total_len} tokens")
    second = plan.second
    prompt, mask = second.tokens(), second.attention_mask()
    actual = generate(model, prompt, second.max_new_tokens, cache=cache, attention_mask=mask)
    expected = expected_generation(model, prompt, second.max_new_tokens, mask, actual)
    expect_same(target, second, expected, actual, "the second sequence through a reset cache differs from uncached",
                label="after the reset")


RESET = Property(
    name="reset",
    summary=(
        "After reset() the cache reports 0 tokens and a second, longer sequence through it equals uncached "
        "generation: lengths, ring pointers or buffers kept across reset, a cache locked to its first prompt."
    ),
    needs=frozenset({"reset"}),
    strategy=reset_plans,
    check=check_reset,
)
