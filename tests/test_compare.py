from __future__ import annotations

import pytest
import torch

from kvverify.checks.compare import (
    GenerationMismatch,
    Tolerance,
    assert_same_generation,
    compare_generations,
    first_difference,
    ulp_distance,
)
from kvverify.reference.model import Generation


def generation(logits: torch.Tensor) -> Generation:
    tokens = logits.argmax(-1)
    return Generation(tokens, logits, tokens, torch.ones_like(tokens), None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ulp_distance_counts_representable_steps(dtype: torch.dtype) -> None:
    x = torch.tensor([1.0, -2.0, 0.0], dtype=dtype)
    up = torch.nextafter(x, torch.full_like(x, 10.0)) if dtype not in (torch.float16, torch.bfloat16) else None
    if up is not None:
        assert ulp_distance(x, up) == 1
    assert ulp_distance(x, x) == 0
    assert ulp_distance(torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype)) == 0


def test_exact_comparison_reports_step_row_and_tokens() -> None:
    expected = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    actual = expected.clone()
    actual[1, 1, 0] += 1e-6
    mismatch = first_difference(generation(expected), generation(actual))
    assert mismatch is not None and (mismatch.step, mismatch.row) == (1, 1)
    assert mismatch.ulps > 0 and mismatch.max_abs == pytest.approx(1e-6, rel=0.1)
    assert first_difference(generation(expected), generation(actual), Tolerance(atol=1e-5)) is None
    with pytest.raises(GenerationMismatch, match="step 1, batch row 1"):
        assert_same_generation(generation(expected), generation(actual))


def test_different_tokens_fail_unless_the_reference_was_a_near_tie() -> None:
    expected = torch.tensor([[[1.0, 1.0 + 1e-6, 0.0], [0.0, 0.0, 5.0]]])
    actual = torch.tensor([[[1.0 + 2e-6, 1.0, 0.0], [0.0, 9.0, 0.0]]])
    # step 0 is a near tie within the tolerance; from there on the paths may differ
    assert first_difference(generation(expected), generation(actual), Tolerance(atol=1e-5)) is None
    far = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 5.0]]])
    flipped = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]]])
    assert first_difference(generation(far), generation(flipped), Tolerance(atol=1e-5)) is not None


def test_a_teacher_forced_run_is_compared_after_a_near_tie() -> None:
    expected = torch.tensor([[[1.0, 1.0 + 1e-6, 0.0], [0.0, 0.0, 5.0]]])
    actual = torch.tensor([[[1.0 + 2e-6, 1.0, 0.0], [0.0, 0.0, 5.1]]])  # step 1: beyond the tolerance
    tolerance = Tolerance(atol=1e-5)
    free = compare_generations(generation(expected), generation(actual), tolerance)
    assert free.mismatch is None and free.near_ties == ((0, 0),), "free-running paths part at the near tie"
    forced = compare_generations(generation(expected), generation(actual), tolerance, teacher_forced=True)
    assert forced.mismatch is not None and (forced.mismatch.step, forced.mismatch.row) == (1, 0)
    assert forced.near_ties == ((0, 0),) and forced.max_abs == pytest.approx(0.1, rel=1e-3)


def test_a_tolerance_without_near_ties_fails_any_token_difference() -> None:
    expected = torch.tensor([[[1.0, 1.0 + 1e-6, 0.0]]])
    actual = torch.tensor([[[1.0 + 2e-6, 1.0, 0.0]]])
    mismatch = first_difference(generation(expected), generation(actual), Tolerance(atol=1e-5, near_ties=False))
    assert mismatch is not None and mismatch.reason == "greedy tokens differ"
