"""A fast-numerics mismatch within the reach of rounding is confirmed in strict numerics before it counts: the
bfloat16 rounding tail that once failed every built-in cache passes, a real bug is still reported (with the strict
comparison below it), and nothing is rerun where there is no fast numerics to confirm or the difference is larger
than rounding reaches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from kvverify.caches import BUILTIN_CACHES
from kvverify.checks import PROPERTIES, make_target
from kvverify.checks.case import Case
from kvverify.checks.compare import GenerationMismatch, Mismatch, tolerance_for
from kvverify.checks.confirm import check_confirmed, in_strict_numerics
from kvverify.checks.properties import stateful
from kvverify.checks.properties.stateful import Operation, Program, machine_for
from kvverify.checks.target import Target
from kvverify.protocol.config import ModelConfig
from tests.targets.buggy import stale_value

GENERATION = PROPERTIES["cached_equals_uncached"]

#: Found by ``pytest properties -n 2`` in a fresh clone: bfloat16, 4 layers of width 8 with layer norm. The
#: uncached logits at step 12 are 0.31 off the float64 evaluation of the same rounded weights, the cached ones
#: 0.075, and the two 0.36 apart (tolerance 0.25); strict numerics gives the same bits both ways.
BF16_TAIL = Case(
    ModelConfig(vocab_size=32, d_model=8, n_layers=4, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=40, norm="layer",
                positional="none", max_seq_len=24, max_batch_size=4, dtype=torch.bfloat16, numerics="fast"),
    prompt=((3, 6, 6, 31, 31, 25, 25, 28, 7, 10, 24),), pad=(0,), max_new_tokens=13, seed=0,
)


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_the_bfloat16_rounding_tail_fails_the_tolerance_and_passes_once_confirmed(cache: str) -> None:
    target = make_target(BUILTIN_CACHES[cache], cache)
    with pytest.raises(GenerationMismatch, match=r"logits differ beyond atol=0\.25"):
        GENERATION.check(target, BF16_TAIL)
    GENERATION.run(target, BF16_TAIL)


def test_a_real_bug_found_in_fast_numerics_is_reported() -> None:
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
                         numerics="fast")
    case = Case(config, prompt=((1, 2, 3),), pad=(0,), max_new_tokens=6)
    with pytest.raises(GenerationMismatch, match="beyond atol"):
        GENERATION.run(make_target(stale_value, "stale"), case)


def test_every_fast_config_in_a_plan_is_made_strict_and_a_strict_plan_is_left_alone() -> None:
    program = Program(BF16_TAIL, (Operation("append", tokens=((1, 2),)),), last=((3,),))
    strict = in_strict_numerics(program)
    assert strict is not None and strict.case.config.numerics == "strict"
    assert strict.case.config.replace(numerics="fast") == BF16_TAIL.config and strict.operations == program.operations
    assert in_strict_numerics((1, BF16_TAIL))[1].config.numerics == "strict"
    assert in_strict_numerics(strict) is None and in_strict_numerics(3) is None


def _mismatch(max_abs: float = 1.0) -> GenerationMismatch:
    return GenerationMismatch(Mismatch(0, 0, max_abs, 1.0, 1, [1], [2], "logits differ beyond atol=0.25",
                                       tolerance_for(torch.bfloat16)))


class _Calls:
    """A check that raises ``fast`` on fast-numerics cases and ``strict`` (None: passes) on strict ones."""

    def __init__(self, fast: Exception | None, strict: Exception | None) -> None:
        self.fast, self.strict, self.numerics = fast, strict, []

    def __call__(self, target: Target, case: Any) -> None:
        self.numerics.append(case.config.numerics)
        error = self.fast if case.config.numerics == "fast" else self.strict
        if error is not None:
            raise error


TARGET = make_target(BUILTIN_CACHES["contiguous"], "contiguous")


def test_a_strict_case_that_fails_is_not_rerun() -> None:
    check = _Calls(fast=None, strict=_mismatch())
    strict_case = in_strict_numerics(BF16_TAIL)
    with pytest.raises(GenerationMismatch):
        check_confirmed(check, TARGET, strict_case)
    assert check.numerics == ["strict"]


def test_the_fast_mismatch_stands_when_strict_numerics_cannot_judge_the_example() -> None:
    fast = _mismatch()
    check = _Calls(fast=fast, strict=RuntimeError("no strict kernel here"))
    with pytest.raises(GenerationMismatch) as raised:
        check_confirmed(check, TARGET, BF16_TAIL)
    assert raised.value is fast and check.numerics == ["fast", "strict"]


def test_a_mismatch_strict_numerics_confirms_is_reported_with_the_strict_comparison_below_it() -> None:
    strict = GenerationMismatch(Mismatch(3, 0, 0.5, 0.1, 9, [1], [2], "logits differ (bitwise comparison)"))
    check = _Calls(fast=_mismatch(), strict=strict)
    with pytest.raises(GenerationMismatch) as raised:
        check_confirmed(check, TARGET, BF16_TAIL)
    report = str(raised.value)
    assert report.index("beyond atol") < report.index("confirmed in strict numerics") < report.index("bitwise"), report
    assert check.numerics == ["fast", "strict"]


def test_a_difference_beyond_the_reach_of_rounding_is_reported_without_a_rerun() -> None:
    check = _Calls(fast=_mismatch(max_abs=1.01), strict=None)  # 4.04 times bfloat16's 0.25
    with pytest.raises(GenerationMismatch):
        check_confirmed(check, TARGET, BF16_TAIL)
    assert check.numerics == ["fast"]


def test_only_a_mismatch_is_confirmed_other_failures_are_raised_at_once() -> None:
    check = _Calls(fast=AssertionError("get_seq_length is 3, expected 4"), strict=None)
    with pytest.raises(AssertionError, match="get_seq_length"):
        check_confirmed(check, TARGET, BF16_TAIL)
    assert check.numerics == ["fast"]


def test_the_compiled_property_is_judged_as_it_runs() -> None:
    assert not PROPERTIES["compiled"].confirm_in_strict
    assert all(p.confirm_in_strict for name, p in PROPERTIES.items() if name != "compiled")


class _FastDifference:
    """``stateful.apply`` that raises a mismatch within rounding's reach once a fast session holds 4 tokens
    (a strict one too when ``in_strict``), counting the sessions of each numerics it sees."""

    def __init__(self, in_strict: bool) -> None:
        self.in_strict, self.operations = in_strict, {"fast": 0, "strict": 0}
        self.real = stateful.apply

    def __call__(self, session: Any, operation: Any) -> bool:
        numerics = session.config.numerics
        self.operations[numerics] += 1
        applied = self.real(session, operation)
        if (numerics == "fast" or self.in_strict) and len(session.tokens[0]) >= 4:
            raise _mismatch(0.3)
        return applied


def _run_machine(config: ModelConfig) -> None:
    with torch.no_grad():
        run_state_machine_as_test(machine_for(TARGET, config), settings=settings(
            max_examples=3, deadline=None, database=None, phases=[Phase.generate], stateful_step_count=8))


MACHINE_CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                             max_batch_size=4, dtype=torch.bfloat16)


def test_the_state_machine_confirms_a_fast_difference_in_strict_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    difference = _FastDifference(in_strict=False)
    monkeypatch.setattr(stateful, "apply", difference)
    _run_machine(MACHINE_CONFIG.replace(numerics="fast"))  # explained by strict numerics: passes
    assert difference.operations["strict"] > 0, "the fast difference was not replayed in strict numerics"


def test_the_state_machine_reports_a_difference_strict_numerics_confirms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stateful, "apply", _FastDifference(in_strict=True))
    with pytest.raises(GenerationMismatch, match="confirmed in strict numerics"):
        _run_machine(MACHINE_CONFIG.replace(numerics="fast"))


def test_the_state_machine_reports_a_strict_difference_without_a_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    difference = _FastDifference(in_strict=True)
    monkeypatch.setattr(stateful, "apply", difference)
    with pytest.raises(GenerationMismatch) as raised:
        _run_machine(MACHINE_CONFIG)
    assert "confirmed" not in str(raised.value) and difference.operations["fast"] == 0
