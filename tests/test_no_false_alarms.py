"""Correct caches pass every property: a lossy cache, an exact cache at production shapes in strict numerics
(bit for bit) and, for the comparisons that differ, in fast numerics (within a tolerance), forks included.
Each comparison steers Hypothesis under a label of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvverify.caches import ContiguousCache
from kvverify.checks import PROPERTIES, make_target, shapes
from kvverify.checks import property as comparisons
from kvverify.checks.case import Case
from kvverify.checks.properties.stateful import Operation, Program, check_program
from kvverify.checks.shapes import shape_space
from kvverify.checks.target import Target
from kvverify.protocol.config import ModelConfig
from kvverify.runs import run_property
from tests.targets.lossy import int8_per_token

#: long_context is opt-in and makes one comparison per example; it takes a minute.
EVERY_PROPERTY = sorted(set(PROPERTIES) - {"long_context"})


def _tokens(rows: int, count: int, first: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple((first + 7 * row + i) % 61 for i in range(count)) for row in range(rows))


def _forking_program(numerics: str) -> Program:
    """Two forks, a crop and appends between them: the copy and the original of each fork hold logs of one
    length, the case that once gave both the label ``append N``."""
    config = ModelConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=48,
                         numerics=numerics)
    case = Case(config, _tokens(2, 5, 0), (0, 1), 1)
    operations = (
        Operation("append", tokens=_tokens(2, 2, 3)),
        Operation("fork", tokens=_tokens(2, 3, 5)),
        Operation("append", tokens=_tokens(2, 1, 9)),
        Operation("fork", tokens=_tokens(2, 2, 11)),
        Operation("crop", argument=-2),
        Operation("fork", tokens=_tokens(2, 1, 13)),
    )
    return Program(case, operations, _tokens(2, 1, 17))


@pytest.fixture
def labels(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every label passed to ``hypothesis.target`` by the comparisons."""
    seen: list[str] = []
    real = comparisons.hypothesis_target

    def spy(observation: float, *, label: str = "") -> float:
        seen.append(label)
        return real(observation, label=label)

    monkeypatch.setattr(comparisons, "hypothesis_target", spy)
    yield seen


@pytest.mark.parametrize(("factory", "numerics"), [(int8_per_token, "strict"), (int8_per_token, "fast"),
                                                   (lambda config: ContiguousCache(), "fast")],
                         ids=["lossy-strict", "lossy-fast", "exact-fast"])
def test_forks_give_each_comparison_its_own_label(factory: object, numerics: str, labels: list[str]) -> None:
    target = make_target(factory, "under test")  # type: ignore[arg-type]
    program = _forking_program(numerics)

    @settings(max_examples=1, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.just(program))
    def run(drawn: Program) -> None:
        labels.clear()  # one example's labels
        check_program(target, drawn)

    run()
    assert len(labels) > 10, f"expected a comparison per append and fork side, saw {labels}"
    assert len(set(labels)) == len(labels), f"a label repeated within one example: {labels}"
    assert not any(" #" in label for label in labels), f"the sessions' own labels collided: {labels}"
    assert any("original of the fork" in label for label in labels), labels


def test_steer_keeps_a_repeated_comparison_apart(labels: list[str]) -> None:
    @settings(max_examples=2, database=None)
    @given(st.just(0))
    def run(_: int) -> None:
        labels.clear()
        assert [comparisons.steer(0.5, "same") for _ in range(3)] == ["same", "same #2", "same #3"]
        assert comparisons.steer(0.5, "other") == "other"

    run()
    assert labels == ["same", "same #2", "same #3", "other"]


#: Seconds one example may take here: a false-alarm check judges verdicts, not speed, and a production-shape
#: example in float16 fast numerics (a padded batch of thousands of tokens) can pass 60 s on a loaded machine.
EXAMPLE_TIME_LIMIT = 300.0


def _assert_passes(target: Target, name: str, examples: int) -> None:
    result = run_property(PROPERTIES[name], target, profile="dev", seed=7, max_examples=examples,
                          time_limit=EXAMPLE_TIME_LIMIT)
    assert result.verdict in ("passed", "skipped"), f"{name} on a correct cache: {result.verdict}\n{result.detail}"
    assert result.verdict == "skipped" or result.examples > 0, result


@pytest.mark.parametrize("name", EVERY_PROPERTY)
def test_a_correct_lossy_cache_passes(name: str) -> None:
    _assert_passes(make_target(int8_per_token, "int8 per token"), name, 60)


#: The properties whose comparisons differ in fast numerics (tolerances by dtype, forks' own labels): production
#: shapes compare bit for bit on every device, so fast numerics there is what these meet, not every property.
FAST_AT_PRODUCTION = ("cached_equals_uncached", "chunked_prefill", "stateful")


@pytest.mark.slow  # production widths: 10 to 60 s a property on 2 cores
@pytest.mark.parametrize("name", FAST_AT_PRODUCTION)
def test_an_exact_cache_in_fast_numerics_passes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production widths in fast numerics (bf16/fp16 within their tolerance): what ``--shapes production`` ran on
    the CPU before the strict oracle was fast enough there, and what a property asking for fast numerics gets."""
    monkeypatch.setattr(shapes, "_PRODUCTION_CPU", replace(shape_space("production"), strict=False))
    target = make_target(lambda config: ContiguousCache(), "contiguous", shapes="production")
    _assert_passes(target, name, 30)


@pytest.mark.slow  # production widths in strict numerics: 5 to 40 s a property on 2 cores
@pytest.mark.parametrize("name", EVERY_PROPERTY)
def test_an_exact_cache_in_strict_numerics_at_production_shapes_passes(name: str) -> None:
    assert shape_space("production").strict  # the CPU's production shapes compare bit for bit
    target = make_target(lambda config: ContiguousCache(), "contiguous", shapes="production")
    _assert_passes(target, name, 15)
