"""Running the engine properties with Hypothesis: the verdicts as the suite's own results (so the table,
JUnit and exit codes are those of ``kvverify verify``), and how many examples reached each hard path."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from hypothesis import Phase, given
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import HypothesisException

from kvverify.checks.watchdog import ExampleTimeout, run_with_time_limit
from kvverify.engines.adapter import COVERAGE, EngineAdapter, EngineRun
from kvverify.engines.properties import check_independent_of_neighbours, check_matches_alone
from kvverify.engines.strategies import neighbour_cases, schedules
from kvverify.reference.threads import torch_threads
from kvverify.runs.runner import PropertyResult, SuiteResult, failure_report
from kvverify.runs.settings import PROFILE_EXAMPLES, profile_settings, use_storage_directory

#: Property 2 runs two engine runs per example: this share of property 1's count.
NEIGHBOUR_SHARE = 1 / 3
PROPERTIES = ("matches_alone", "independent_of_neighbours")


@dataclass
class EngineResult:
    """A suite result plus the coverage of property 1: of ``examples`` passing examples, ``reached[path]``
    took that hard path (see :data:`~kvverify.engines.adapter.COVERAGE`; ``paths``: those the engine's
    schedules can reach). For an engine compared within a tolerance, ``largest_difference`` is the largest |Δ|
    of any logit against the oracle over those examples, and ``near_ties`` the near ties met."""

    suite: SuiteResult
    examples: int = 0
    reached: Counter[str] = field(default_factory=Counter)
    paths: tuple[str, ...] = COVERAGE
    largest_difference: float | None = None
    near_ties: int = 0

    def share(self, path: str) -> float:
        return self.reached[path] / self.examples if self.examples else 0.0


def examples_for(engine: EngineAdapter, profile: str, prop: str, max_examples: int | None = None) -> int:
    """Examples of ``prop`` under ``profile`` for ``engine`` (``max_examples`` in place of the profile's count)."""
    if profile not in PROFILE_EXAMPLES:
        raise ValueError(f"profile must be one of {', '.join(PROFILE_EXAMPLES)}; got {profile!r}")
    count = engine.examples[profile] if max_examples is None else max_examples
    return count if prop == "matches_alone" else max(1, round(count * NEIGHBOUR_SHARE))


def run_engine_suite(
    engine: EngineAdapter, *, profile: str = "ci", seed: int = 0, max_examples: int | None = None,
    properties: tuple[str, ...] | None = None, reproduce: str = "",
    patch: Callable[[], AbstractContextManager[Any]] = nullcontext, shrink: bool = True,
    time_limit: float | Literal["engine"] | None = "engine",
) -> EngineResult:
    """The engine's properties (or those named) against ``engine``; ``patch()`` is entered around every engine
    run (a planted bug, for the mutants). ``shrink=False`` reports the first failing schedule as found (each
    shrinking step is a whole engine run: a minute or more in all; a kill needs none). ``time_limit``: seconds
    one example may take (None: no limit; "engine": the engine's own, ``engine.time_limit``); past it the engine
    is reported as hanging, unshrunk."""
    properties = engine.properties if properties is None else properties
    limit = engine.time_limit if time_limit == "engine" else time_limit
    unknown = [p for p in properties if p not in engine.properties]
    if unknown:
        raise ValueError(f"engine property {unknown[0]!r} is not checked for {engine.name}; expected some of "
                         f"{', '.join(engine.properties)}")
    use_storage_directory()
    paths = tuple(p for p in COVERAGE if p != "sliding" or engine.space.has_sliding)
    result = EngineResult(SuiteResult(engine.name, seed, profile), paths=paths)
    for name in properties:
        with torch_threads(1):
            outcome = _run_property(engine, name, result, profile=profile, seed=seed, max_examples=max_examples,
                                    patch=patch, shrink=shrink, time_limit=limit)
        if name == "matches_alone" and outcome.verdict == "passed" and result.largest_difference is not None:
            outcome = replace(outcome, largest_difference=result.largest_difference)
        if reproduce and outcome.verdict in ("failed", "error"):
            outcome = replace(outcome, reproduce=f"{reproduce} --property {name}")
        result.suite.results.append(outcome)
    return result


@dataclass
class _Progress:
    start: float
    passed: int = 0
    first_failure: float | None = None
    last_case: Any = None


def _run_property(engine: EngineAdapter, name: str, result: EngineResult, *, profile: str, seed: int,
                  max_examples: int | None, patch: Callable[[], AbstractContextManager[Any]],
                  shrink: bool, time_limit: float | None) -> PropertyResult:
    settings = profile_settings(profile, max_examples=examples_for(engine, profile, name, max_examples))
    if not shrink:
        settings = hypothesis_settings(settings, phases=[p for p in settings.phases if p is not Phase.shrink])
    progress = _Progress(start=time.perf_counter())
    strategy = schedules(engine=engine) if name == "matches_alone" else neighbour_cases(engine=engine)

    @settings
    @given(case=strategy)
    def test(case: Any) -> None:
        progress.last_case = case

        def check() -> EngineRun | None:
            with patch():
                if name == "matches_alone":
                    return check_matches_alone(engine, case)
                check_independent_of_neighbours(engine, case)
                return None

        try:
            run = run_with_time_limit(check, time_limit, f"one example of {name}", case)
        except BaseException:
            if progress.first_failure is None:
                progress.first_failure = time.perf_counter() - progress.start
            raise
        if progress.first_failure is None:
            progress.passed += 1
            if run is not None:
                result.examples += 1
                result.reached.update(run.reached)
                if run.largest_difference is not None:
                    result.largest_difference = max(result.largest_difference or 0.0, run.largest_difference)
                    result.near_ties += run.near_ties

    test = hypothesis_seed(seed)(test)
    try:
        test()
    except ExampleTimeout as timeout:  # not shrunk: every shrinking step could hang as long again
        return PropertyResult(name, "failed", progress.passed, time.perf_counter() - progress.start,
                              failure_report(timeout, progress.last_case, label="schedule (not shrunk)"),
                              first_failure_seconds=progress.first_failure, case=progress.last_case)
    except HypothesisException as error:  # the strategy or settings, not the engine
        return PropertyResult(name, "error", progress.passed, time.perf_counter() - progress.start,
                              f"{type(error).__name__}: {error}")
    except Exception as error:  # the minimal failing case's error, after shrinking
        return PropertyResult(name, "failed", progress.passed, time.perf_counter() - progress.start,
                              failure_report(error, progress.last_case,
                                              label="minimal schedule" if shrink else "schedule (not shrunk)"),
                              first_failure_seconds=progress.first_failure, case=progress.last_case)
    return PropertyResult(name, "passed", progress.passed, time.perf_counter() - progress.start)


def coverage_rows(result: EngineResult) -> Iterator[tuple[str, int, float]]:
    """(path, examples that reached it, share of property 1's passing examples), in :data:`COVERAGE` order, for
    the paths the engine's schedules can reach."""
    for path in result.paths:
        yield path, result.reached[path], result.share(path)
