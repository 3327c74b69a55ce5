"""A fast-numerics mismatch confirmed in strict numerics before it is reported as the cache's.

Fast numerics compares cached and uncached logits within the dtype's measured tolerance
(:data:`~kvverify.checks.compare.FAST_TOLERANCES`). The half types' rounding has a long tail: a bfloat16 model of
4 layers at width 8 whose residual stream carries a large mean puts its final norm's output 11% off the float64
evaluation of the same rounded weights, and its uncached and cached logits 0.36 apart (tolerance 0.25; the
float64 logits side with the cache). No fixed tolerance separates that tail from a small bug.

So a mismatch in fast numerics is checked once more, the same example in strict numerics: the same cache,
dtype, shapes, tokens and operations, with the fixed-order kernels, compared bit for bit (or within a lossy
cache's own declared tolerance). The cache sees the same calls either way; only the model's rounding changes.
Strict numerics agreeing means the difference was the standard kernels' rounding, and the example passes; strict
numerics disagreeing confirms the failure, which is reported as found, with the strict comparison below it.

Only logit differences that rounding could reach are rerun: up to :data:`ROUNDING_REACH` times the tolerance
(the tail above reached 1.45 times it; 10,000 drawn bfloat16 cases at most 0.86 times). A larger one is reported
at once, which keeps shrinking a real bug in fast numerics at the cost it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hypothesis import event
from hypothesis.control import currently_in_test_context

from kvverify.checks.compare import GenerationMismatch
from kvverify.checks.target import Target
from kvverify.protocol.config import ModelConfig

#: Logit differences up to this many times the tolerance are confirmed in strict numerics; larger ones are not
#: rounding and are reported as found.
ROUNDING_REACH = 4.0

#: What Hypothesis' statistics (``--hypothesis-show-statistics``) call an example the confirmation passed.
EXPLAINED = "fast numerics beyond the tolerance, identical in strict numerics"


def in_strict_numerics(plan: Any) -> Any | None:
    """``plan`` (a case, or a dataclass or tuple holding cases) with every fast-numerics config made strict;
    None when nothing in it runs fast numerics."""
    made_strict = _map_configs(plan, lambda c: c.replace(numerics="strict") if c.numerics == "fast" else c)
    return made_strict if made_strict is not plan else None


def _map_configs(value: Any, change: Callable[[ModelConfig], ModelConfig]) -> Any:
    """``value`` with ``change`` applied to every model config in it: the same object where nothing changed."""
    if isinstance(value, ModelConfig):
        return change(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            before = getattr(value, field.name)
            after = _map_configs(before, change)
            if after is not before:
                changes[field.name] = after
        return dataclasses.replace(value, **changes) if changes else value
    if type(value) is tuple:
        items = tuple(_map_configs(item, change) for item in value)
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


def check_confirmed(check: Callable[[Target, Any], None], target: Target, plan: Any) -> None:
    """``check(target, plan)``; a :class:`GenerationMismatch` in fast numerics stands only if the same plan
    in strict numerics fails too (then the fast mismatch is raised, the strict one noted below it)."""
    try:
        check(target, plan)
    except GenerationMismatch as fast:
        strict = in_strict_numerics(plan)
        confirm(fast, None if strict is None else lambda: check(target, strict))


def confirm(fast: GenerationMismatch, strict_check: Callable[[], None] | None) -> None:
    """Raise ``fast`` unless it is within rounding's reach and ``strict_check``, the same example in strict
    numerics, passes (an example strict numerics cannot judge leaves it standing); a confirmed one is raised with
    the strict failure noted below it. None: there is no fast numerics to confirm."""
    if strict_check is None or not _within_rounding_reach(fast):
        raise fast
    try:
        strict_check()
    except AssertionError as confirmed:
        note = f"confirmed in strict numerics (the same example, fixed-order kernels): {confirmed}"
        raise fast.noted(note) from None
    except Exception:  # strict numerics could not judge this example: the fast mismatch stands as found
        raise fast from None
    if currently_in_test_context():
        event(EXPLAINED)


def _within_rounding_reach(error: GenerationMismatch) -> bool:
    """Whether a mismatch is a logit difference within :data:`ROUNDING_REACH` times the tolerance it broke."""
    mismatch = error.mismatch
    allowed = mismatch.tolerance.atol if mismatch.tolerance is not None else 0.0
    return mismatch.reason.startswith("logits differ") and mismatch.max_abs <= ROUNDING_REACH * allowed
