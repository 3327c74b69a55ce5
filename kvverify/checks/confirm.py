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

#: What Hypothesis' statistics (``--hypothesis-show-statistics``) call an example the confirmation passed.
EXPLAINED = "fast numerics beyond the tolerance, identical in strict numerics"


def in_strict_numerics(plan: Any) -> Any | None:
    """``plan`` (a case, or a dataclass or tuple holding cases) with every fast-numerics config made strict;
    None when nothing in it runs fast numerics."""
    changed, strict = _strict(plan)
    return strict if changed else None


def _strict(value: Any) -> tuple[bool, Any]:
    if isinstance(value, ModelConfig):
        return (True, value.replace(numerics="strict")) if value.numerics == "fast" else (False, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            changed, strict = _strict(getattr(value, field.name))
            if changed:
                changes[field.name] = strict
        return (True, dataclasses.replace(value, **changes)) if changes else (False, value)
    if type(value) is tuple:
        results = [_strict(item) for item in value]
        if any(changed for changed, _ in results):
            return True, tuple(strict for _, strict in results)
    return False, value


def check_confirmed(check: Callable[[Target, Any], None], target: Target, plan: Any) -> None:
    """``check(target, plan)``; a :class:`GenerationMismatch` in fast numerics stands only if the same plan
    in strict numerics fails too (then the fast mismatch is raised, the strict one noted below it)."""
    try:
        check(target, plan)
    except GenerationMismatch as fast:
        strict = in_strict_numerics(plan)
        if strict is None:
            raise
        try:
            check(target, strict)
        except AssertionError as confirmed:
            note = f"confirmed in strict numerics (the same example, fixed-order kernels): {confirmed}"
            raise fast.noted(note) from None
        except Exception:  # strict numerics could not judge this example: the fast mismatch stands as found
            raise fast from None
        if currently_in_test_context():
            event(EXPLAINED)
