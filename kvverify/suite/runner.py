"""Running properties against a target with Hypothesis, outside or inside pytest."""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from hypothesis import given
from hypothesis import seed as hypothesis_seed

from kvverify.protocol import CacheFactory
from kvverify.settings import profile_settings
from kvverify.suite.properties import PROPERTIES, Property
from kvverify.suite.target import Target, make_target

Verdict = Literal["passed", "failed", "skipped", "error"]


@dataclass(frozen=True)
class PropertyResult:
    """examples: cases run before the first failure (all of them when it passed); seconds: the whole run,
    shrinking included; first_failure_seconds: time to the first failing case, when one was found."""

    name: str
    verdict: Verdict
    examples: int
    seconds: float
    detail: str = ""
    first_failure_seconds: float | None = None
    reproduce: str = ""


@dataclass(frozen=True)
class SuiteResult:
    target: str
    seed: int
    profile: str
    results: list[PropertyResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.verdict in ("passed", "skipped") for r in self.results)

    @property
    def failures(self) -> list[PropertyResult]:
        return [r for r in self.results if r.verdict in ("failed", "error")]


class CacheCheckFailed(AssertionError):
    """A property failed for the cache; the message carries every failure's report."""

    def __init__(self, result: SuiteResult) -> None:
        self.result = result
        reports = "\n\n".join(f"[{r.name}] {r.detail}" for r in result.failures)
        super().__init__(f"{len(result.failures)} propert(y/ies) failed for {result.target}:\n\n{reports}")


def _failure_report(error: BaseException, case: Any) -> str:
    lines = [f"{type(error).__name__}: {error}" if not isinstance(error, AssertionError) else str(error)]
    if case is not None and hasattr(case, "describe"):
        lines += ["", "minimal case:", *("  " + line for line in case.describe().splitlines())]
    notes = [n for n in getattr(error, "__notes__", []) if "reproduce_failure" in n or "@reproduce" in n]
    lines += notes
    if not isinstance(error, AssertionError):
        lines += ["", "raised at:", *traceback.format_exception(error)[-3:]]
    return "\n".join(line.rstrip() for line in lines)


def property_test(prop: Property, target: Target, *, profile: str = "ci", seed: int | None = None) -> Any:
    """The Hypothesis test of one property against one target, ready to call (or to return from a pytest test)."""
    settings = profile_settings(profile)

    @settings
    @given(case=prop.strategy(target))
    def test(case: Any) -> None:
        prop.check(target, case)

    return hypothesis_seed(seed)(test) if seed is not None else test


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` threads for a while. The suite's tensors are tiny: one thread is several times
    faster than two that contend with other processes for the same cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_property(prop: Property, target: Target, *, profile: str = "ci", seed: int | None = None) -> PropertyResult:
    with torch_threads(1):
        return _run_property(prop, target, profile=profile, seed=seed)


def _run_property(prop: Property, target: Target, *, profile: str, seed: int | None) -> PropertyResult:
    missing = prop.needs - target.capabilities
    if missing:
        return PropertyResult(prop.name, "skipped", 0, 0.0, f"the cache has no {', '.join(sorted(missing))}()")
    settings = profile_settings(profile)
    progress = _Progress(start=time.perf_counter())

    @settings
    @given(case=prop.strategy(target))
    def test(case: Any) -> None:
        progress.last_case = case
        try:
            prop.check(target, case)
        except BaseException:
            if progress.first_failure is None:
                progress.first_failure = time.perf_counter() - progress.start
            raise
        if progress.first_failure is None:
            progress.passed += 1

    if seed is not None:
        test = hypothesis_seed(seed)(test)
    try:
        test()
    except Exception as error:  # the minimal failing case's error, after shrinking
        return PropertyResult(
            prop.name, "failed", progress.passed, time.perf_counter() - progress.start,
            _failure_report(error, progress.last_case), first_failure_seconds=progress.first_failure,
        )
    return PropertyResult(prop.name, "passed", progress.passed, time.perf_counter() - progress.start)


@dataclass
class _Progress:
    start: float
    passed: int = 0
    first_failure: float | None = None
    last_case: Any = None


def run_suite(
    factory: CacheFactory,
    *,
    target: str,
    profile: str = "ci",
    seed: int | None = None,
    properties: Sequence[str] | None = None,
) -> SuiteResult:
    """Run every property (or the named ones) against the cache the factory builds."""
    chosen = list(PROPERTIES) if properties is None else list(properties)
    unknown = [name for name in chosen if name not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown propert(y/ies) {unknown}; expected some of {sorted(PROPERTIES)}")
    seed = random.randrange(2**32) if seed is None else seed
    described = make_target(factory, target)
    results = [run_property(PROPERTIES[name], described, profile=profile, seed=seed) for name in chosen]
    return SuiteResult(target, seed, profile, results)


def check_cache(
    factory: CacheFactory, *, profile: str = "ci", seed: int | None = None, name: str | None = None
) -> SuiteResult:
    """Run the whole suite against a cache; raise :class:`CacheCheckFailed` with every failure's report.

    >>> import kvverify
    >>> kvverify.check_cache(kvverify.ContiguousCache.from_config, profile="dev")  # doctest: +SKIP
    """
    label = name or str(getattr(factory, "__qualname__", "cache"))
    result = run_suite(factory, target=label, profile=profile, seed=seed)
    if not result.ok:
        raise CacheCheckFailed(result)
    return result
