"""What a property is, and the comparisons every property shares."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from hypothesis import strategies as st
from hypothesis import target as hypothesis_target
from hypothesis.control import current_build_context, currently_in_test_context

from kvverify.checks import drift
from kvverify.checks.case import Case
from kvverify.checks.compare import GenerationMismatch, first_difference
from kvverify.checks.confirm import check_confirmed
from kvverify.checks.strategies import cases, token_rows
from kvverify.checks.target import Target
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import Generation

Ex = TypeVar("Ex")


@dataclass(frozen=True)
class Property:
    """name: a test-id-friendly name; summary: one sentence, with the bug classes it catches;
    needs: optional cache methods it uses (skipped, with the reason, when the target lacks one);
    skip: why the property does not apply to a target (None: it does), for conditions other than methods;
    confirm_in_strict: a mismatch in fast numerics stands only if the example fails in strict numerics too
    (:mod:`kvverify.checks.confirm`); False where strict numerics is not what the property compares."""

    name: str
    summary: str
    needs: frozenset[str]
    strategy: Callable[[Target], st.SearchStrategy[Any]]
    check: Callable[[Target, Any], None]
    skip: Callable[[Target], str | None] | None = None
    confirm_in_strict: bool = True

    def run(self, target: Target, plan: Any) -> None:
        """Check one drawn example (``plan``), as the suite judges it: :attr:`check`, with a fast-numerics
        mismatch confirmed in strict numerics when :attr:`confirm_in_strict`."""
        if self.confirm_in_strict:
            check_confirmed(self.check, target, plan)
        else:
            self.check(target, plan)

    def skip_reason(self, target: Target) -> str | None:
        """Why the property is skipped for ``target`` (a method it lacks, or :attr:`skip`'s reason); None: it runs."""
        if target.declaration.keeps is not None and self.name not in ("cached_equals_uncached", "continuation"):
            return ("the cache keeps a subset of its tokens (CacheDeclaration(keeps=...)): only "
                    "cached_equals_uncached and continuation compare it, through the eviction oracle")
        missing = self.needs - target.capabilities
        if missing:
            return f"the cache has no {', '.join(f'{m}()' for m in sorted(missing))}"
        return None if self.skip is None else self.skip(target)


def expect_same(
    target: Target, case: Case, expected: Generation, actual: Generation, what: str, label: str = ""
) -> None:
    """Compare bit for bit, or within the target's tolerance; steer Hypothesis toward larger errors under
    ``label`` (see :func:`expect_same_for`)."""
    expect_same_for(target, case.config, expected, actual, what, label)


def expect_same_for(
    target: Target, config: ModelConfig, expected: Generation, actual: Generation, what: str, label: str = ""
) -> None:
    """:func:`expect_same` for a configuration rather than a whole case. ``label`` names the comparison for
    ``hypothesis.target``: the same comparison in every example, so that Hypothesis steers each toward larger
    errors (``what`` when empty; :func:`steer` keeps two comparisons of one example apart)."""
    tolerance = target.tolerance(config)
    mismatch = first_difference(expected, actual, tolerance)
    if tolerance is not None and currently_in_test_context():
        error = float((expected.logits.double() - actual.logits.double()).abs().nan_to_num(1e30).max())
        steer(error, f"max abs logit error: {label or what}")
        drift.record(drift.compared_difference(expected.logits, actual.logits, expected.tokens, actual.tokens))
    if mismatch is not None:
        raise GenerationMismatch(mismatch, f"{what}: ")


class _Labels(threading.local):
    """The labels :func:`steer` gave in the current example (per thread: examples may run on a watchdog's)."""

    def __init__(self) -> None:
        self.context: object = None
        self.used: set[str] = set()


_LABELS = _Labels()


def steer(observation: float, label: str) -> str:
    """``hypothesis.target(observation, label=...)``, with a label no other call of this example has used.

    Hypothesis refuses a label twice in one example, and an example may make one comparison several times (two
    sessions of a fork appending at the same length, a loop over rows): the second gets ``label #2``, the third
    ``label #3``, the same in every example, so each stays a distinct, steerable target. Returns the label used."""
    context = current_build_context()
    if _LABELS.context is not context:
        _LABELS.context, _LABELS.used = context, set()
    distinct, count = label, 1
    while distinct in _LABELS.used:
        count += 1
        distinct = f"{label} #{count}"
    _LABELS.used.add(distinct)
    hypothesis_target(observation, label=distinct)
    return distinct


def as_generation(logits: torch.Tensor) -> Generation:
    """Forward logits (B, T, vocab) viewed as a generation of T greedy steps, for :func:`expect_same`."""
    tokens = logits.argmax(-1)
    return Generation(tokens=tokens, logits=logits, sequences=tokens, attention_mask=tokens, cache=None)


def join(first: Generation, second: Generation) -> Generation:
    """Two generations, the second continuing the first, as one (tokens and logits concatenated)."""
    return Generation(
        tokens=torch.cat((first.tokens, second.tokens), dim=1),
        logits=torch.cat((first.logits, second.logits), dim=1),
        sequences=second.sequences,
        attention_mask=second.attention_mask,
        cache=second.cache,
    )


def expect_length(cache: object, expected: int, what: str) -> None:
    """``get_seq_length()`` must report ``expected`` tokens."""
    length = cache.get_seq_length()  # type: ignore[attr-defined]
    assert length == expected, f"{what}: get_seq_length() is {length!r}, expected {expected}"


def numerics_cases(target: Target, **kwargs: Any) -> st.SearchStrategy[Case]:
    """Strict numerics three times in four (float32 and float64 mostly, the half types too: strict numerics is
    bitwise in every dtype); fast numerics in any dtype otherwise."""
    constraints = {**target.config_constraints(), **kwargs}
    strict = cases(dtype=("float32", "float64", "float32", "float64", "bfloat16", "float16"), numerics="strict",
                   **constraints)
    fast = cases(dtype=("float32", "float64", "bfloat16", "float16"), numerics="fast", **constraints)
    return st.one_of(strict, strict, strict, fast)


def strict_cases(target: Target, **kwargs: Any) -> st.SearchStrategy[Case]:
    """Strict numerics only (float32/float64): for comparisons that are exact only there (batch invariance)."""
    return cases(dtype=("float32", "float64"), numerics="strict", **{**target.config_constraints(), **kwargs})


class Draw(Protocol):
    """What ``@st.composite`` functions and ``st.data()`` both offer: draw a value from a strategy."""

    def __call__(self, strategy: st.SearchStrategy[Ex], label: Any = None) -> Ex: ...


def random_tokens(draw: Draw, config: ModelConfig, rows: int, count: int, label: str) -> tuple[tuple[int, ...], ...]:
    """``rows`` lists of ``count`` token ids (:func:`~kvverify.checks.strategies.token_rows`)."""
    return token_rows(draw, config.vocab_size, rows, count, label)


def with_room(case: Case, room: int) -> Case | None:
    """The case with ``max_new_tokens`` cut so that ``room`` more tokens fit in ``max_seq_len``; None when even
    one new token leaves no room."""
    spare = case.config.max_seq_len - case.total_len - room
    if spare >= 0:
        return case
    new = case.max_new_tokens + spare
    return Case(case.config, case.prompt, case.pad, new, case.seed) if new >= 1 else None


def tensor(rows: tuple[tuple[int, ...], ...], like: torch.Tensor) -> torch.Tensor:
    """Token rows as a (B, T) long tensor on ``like``'s device (T may be 0)."""
    return torch.tensor(rows, dtype=torch.long, device=like.device).reshape(len(rows), -1)
