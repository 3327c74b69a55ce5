"""Running properties against a target with Hypothesis, outside or inside pytest."""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from hypothesis import given, reject
from hypothesis import seed as hypothesis_seed
from hypothesis import target as hypothesis_target
from hypothesis.database import ExampleDatabase
from hypothesis.errors import HypothesisException, Unsatisfiable, UnsatisfiedAssumption

from kvverify.checks.blind_spots import BlindSpots, unsupported_in, verdict_without_examples
from kvverify.checks.drift import watching
from kvverify.checks.loading import TargetError
from kvverify.checks.properties import ALL_PROPERTIES, Property
from kvverify.checks.target import Target, make_target
from kvverify.checks.watchdog import (
    DEFAULT_TIME_LIMIT,
    ExampleTimeout,
    TargetExit,
    run_with_time_limit,
    tell,
)
from kvverify.protocol.cache import CacheFactory
from kvverify.reference.threads import torch_threads
from kvverify.runs.database import as_database, key_examples
from kvverify.runs.options import check_options
from kvverify.runs.settings import profile_settings, use_storage_directory

Verdict = Literal["passed", "failed", "skipped", "error"]

#: Tokens held past which Hypothesis' targeted phase no longer steers (a page of 64 and a few more).
LONG_ENOUGH = 72


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
    case: Any = field(default=None, compare=False, repr=False)  # the minimal failing case, when one was found
    unsupported: int = 0  # examples skipped because the cache raised kvverify.Unsupported
    unsupported_why: str = ""  # the most frequent reason, with its count
    largest_difference: float | None = None  # a tolerant comparison's largest max-abs logit difference


@dataclass(frozen=True)
class SuiteResult:
    """device: where the models and caches ran (``cpu``, ``cuda``, ``cuda:1``); shapes: the shape space."""

    target: str
    seed: int
    profile: str
    results: list[PropertyResult] = field(default_factory=list)
    device: str = "cpu"
    shapes: str = "default"
    declaration: str = "CacheDeclaration()"  # what the cache declared, as a constructor call

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
        reports = "\n\n".join(
            f"[{r.name}] {r.detail}" + (f"\nreproduce: {r.reproduce}" if r.reproduce else "") for r in result.failures
        )
        super().__init__(f"{len(result.failures)} propert(y/ies) failed for {result.target}:\n\n{reports}")


def failure_report(error: BaseException, case: Any, where: str = "", label: str = "minimal case") -> str:
    """The error, the case (its config, prompt and length), where the cache went wrong, the reproduction blob."""
    lines = [f"{type(error).__name__}: {error}" if not isinstance(error, AssertionError) else str(error)]
    if where:
        lines += ["", where]
    if case is not None and hasattr(case, "describe"):
        lines += ["", f"{label}:", *("  " + line for line in case.describe().splitlines())]
    elif case is not None:
        lines += ["", f"{label}: {case!r}"]
    notes = [n for n in getattr(error, "__notes__", []) if "reproduce_failure" in n or "@reproduce" in n]
    lines += notes
    if not isinstance(error, (AssertionError, ExampleTimeout)):
        lines += ["", "raised at:", *traceback.format_tb(error.__traceback__)[-2:]]
    return "\n".join(line.rstrip() for line in lines)


def _checked(prop: Property, target: Target, case: Any, time_limit: float | None) -> None:
    run_with_time_limit(lambda: prop.run(target, case), time_limit, f"one example of {prop.name}", case)


def property_test(
    prop: Property, target: Target, *, profile: str | None = "ci", seed: int | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT, max_examples: int | None = None,
) -> Any:
    """The Hypothesis test of one property against one target, ready to call (or to return from a pytest test).

    ``profile``: a kvverify profile, giving this property its share of examples (of ``max_examples`` in place
    of the profile's count, when given); None keeps the settings Hypothesis has loaded."""

    @given(case=prop.strategy(target))
    def test(case: Any) -> None:
        try:
            _checked(prop, target, case, time_limit)
        except UnsatisfiedAssumption:  # the check's own reject(): skipped, neither a pass nor a failure
            raise
        except Exception as error:
            if unsupported_in(error) is None:
                raise
            reject()  # a shape the cache does not support

    if profile is not None:
        test = profile_settings(profile, prop.name, max_examples=max_examples)(test)
    return hypothesis_seed(seed)(test) if seed is not None else test


def run_property(
    prop: Property, target: Target, *, profile: str = "ci", seed: int | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT, locate: bool = True, max_examples: int | None = None,
    database: ExampleDatabase | None = None,
) -> PropertyResult:
    """Run one property; a failure's report says where the cache first went wrong unless ``locate`` is False.
    Each example may take ``time_limit`` seconds (None: no limit). ``max_examples`` replaces the profile's
    count of examples (the property runs its share of it); failures are saved in ``database`` and replayed first."""
    with torch_threads(1):
        return _run_property(prop, target, profile=profile, seed=seed, time_limit=time_limit, locate=locate,
                             max_examples=max_examples, database=database)


def _run_property(
    prop: Property, target: Target, *, profile: str, seed: int | None, time_limit: float | None, locate: bool,
    max_examples: int | None, database: ExampleDatabase | None,
) -> PropertyResult:
    reason = prop.skip_reason(target)
    if reason is not None:
        return PropertyResult(prop.name, "skipped", 0, 0.0, reason)
    with watching() as drift:
        result = _run_watched(prop, target, profile=profile, seed=seed, time_limit=time_limit, locate=locate,
                              max_examples=max_examples, database=database)
    lossy = target.declaration.lossy_atol is not None
    return replace(result, largest_difference=drift.largest) if lossy and result.verdict == "passed" else result


def _run_watched(
    prop: Property, target: Target, *, profile: str, seed: int | None, time_limit: float | None, locate: bool,
    max_examples: int | None, database: ExampleDatabase | None,
) -> PropertyResult:
    settings = profile_settings(profile, prop.name, max_examples=max_examples, database=database)
    progress = _Progress(start=time.perf_counter())

    @given(case=prop.strategy(target))
    def test(case: Any) -> None:
        progress.last_case = case
        _aim_long(case)
        try:
            _checked(prop, target, case, time_limit)
        except UnsatisfiedAssumption:  # the check's own reject(): skipped, neither a pass nor a failure
            raise
        except Exception as error:
            why = unsupported_in(error)
            if why is not None:
                progress.blind.add(why)
                reject()  # skipped, and counted: the cache does not support this example's shape
            if progress.first_failure is None:
                progress.first_failure = time.perf_counter() - progress.start
            raise
        except BaseException:
            if progress.first_failure is None:
                progress.first_failure = time.perf_counter() - progress.start
            raise
        if progress.first_failure is None:
            progress.passed += 1

    key_examples(test, target.name, prop.name, target.shapes, str(target.device))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test = settings(test)  # after @seed, which turns the database off: a failure saved is replayed whatever the seed
    try:
        test()
    except ExampleTimeout as timeout:  # not shrunk: every shrinking step could hang as long again
        detail = failure_report(timeout, progress.last_case, label="case (not shrunk)")
        return _failed(prop, progress, detail)
    except Unsatisfiable:  # no example ran: every one was Unsupported, or none fits the declaration
        return PropertyResult(prop.name, "skipped", 0, time.perf_counter() - progress.start,
                              verdict_without_examples(progress.blind, target.declaration),
                              unsupported=progress.blind.count, unsupported_why=progress.blind.summary())
    except HypothesisException as error:  # the strategy or settings, not the cache: an error of the suite
        return PropertyResult(prop.name, "error", progress.passed, time.perf_counter() - progress.start,
                              f"{type(error).__name__}: {error}")
    except Exception as error:  # the minimal failing case's error, after shrinking
        where = _locate(prop, target, progress.last_case, time_limit) if locate else ""
        return _failed(prop, progress, failure_report(error, progress.last_case, where))
    return PropertyResult(prop.name, "passed", progress.passed, time.perf_counter() - progress.start,
                          unsupported=progress.blind.count, unsupported_why=progress.blind.summary())


def _aim_long(case: Any) -> None:
    """Steer Hypothesis' targeted phase toward sequences past a 64-token page (bugs at 50+ tokens and at a page
    boundary need them), and no further: longer ones cost more (one uncached forward per generated token)."""
    held = getattr(case, "total_len", None) or getattr(getattr(case, "case", None), "total_len", None)
    if isinstance(held, int):
        hypothesis_target(float(min(held, LONG_ENOUGH)), label="tokens held, up to 72")


def _failed(prop: Property, progress: _Progress, detail: str) -> PropertyResult:
    return PropertyResult(prop.name, "failed", progress.passed, time.perf_counter() - progress.start, detail,
                          first_failure_seconds=progress.first_failure, case=progress.last_case)


def _locate(prop: Property, target: Target, case: Any, time_limit: float | None) -> str:
    from kvverify.checks.locate import locate

    try:
        return locate(prop.check, target, case, time_limit)
    except (Exception, ExampleTimeout) as error:  # locating is a courtesy: never let it hide the failure itself
        return f"where: could not be located ({type(error).__name__}: {error})."


@dataclass
class _Progress:
    start: float
    passed: int = 0
    first_failure: float | None = None
    last_case: Any = None
    blind: BlindSpots = field(default_factory=BlindSpots)


def run_suite(
    factory: CacheFactory,
    *,
    target: str,
    profile: str = "ci",
    seed: int | None = None,
    properties: Sequence[str] | str | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    reproduce: str | None = None,
    stop_at_first_failure: bool = False,
    device: str | torch.device | None = None,
    max_examples: int | None = None,
    repro_script: str | None = None,
    shapes: str = "default",
    database: str | ExampleDatabase | None = None,
) -> SuiteResult:
    """Run every property (or the named ones: a name or a list of names) against the cache the factory builds,
    with every model, prompt and cache on ``device`` (the CPU when None).

    ``max_examples``: in place of the profile's count of examples (each property runs its share of it).
    ``shapes``: ``"default"`` (toy models) or ``"production"`` (:mod:`kvverify.checks.shapes`).
    Hypothesis' own files go to :func:`~kvverify.runs.settings.storage_directory`, not the working directory.

    ``database``: a directory, ``redis://HOST:PORT[/DB]`` or a Hypothesis ``ExampleDatabase`` where failing
    examples are saved and replayed first by the next run, whatever its seed (:mod:`kvverify.runs.database`).

    ``time_limit``: seconds one example may take (None: no limit); probing the target may take
    :data:`PROBE_CALLS` times as long.

    ``stop_at_first_failure``: skip the remaining properties once one fails (a kill is a kill).

    ``reproduce``: a command that reruns the suite with this seed; each failure gets it with ``--property NAME``.

    ``repro_script``: a path; the first failure's minimal case is written there as a self-contained Python script
    (:mod:`kvverify.runs.repro`) that exits 1 while the bug is there.
    Raises :class:`~kvverify.checks.loading.TargetError` when the factory is unusable or declares other devices,
    :class:`~kvverify.checks.devices.DeviceError` when this machine lacks the device, ValueError naming what
    is expected for a wrong profile, property, time limit, example count or database (a DatabaseError).
    """
    chosen = check_options(profile=profile, properties=properties, time_limit=time_limit, max_examples=max_examples)
    seed = random.randrange(2**32) if seed is None else seed
    examples = as_database(database)
    use_storage_directory()
    described = describe_target(factory, target, time_limit=time_limit, device=device, shapes=shapes)
    tell("suite", target, seed, profile, str(described.device), shapes, described.declaration.describe())
    results = []
    for name in chosen:
        tell("property", name)
        result = run_property(ALL_PROPERTIES[name], described, profile=profile, seed=seed, time_limit=time_limit,
                              max_examples=max_examples, database=examples)
        if reproduce and result.verdict in ("failed", "error"):
            result = replace(result, reproduce=f"{reproduce} --property {name}")
        if repro_script and result.verdict == "failed" and result.case is not None:
            from kvverify.runs.repro import write_repro_script

            path = write_repro_script(repro_script, target, name, result.case)
            result = replace(result, detail=f"{result.detail}\nrepro script: python {path}")
            repro_script = None  # the first failure's
        tell("result", replace(result, case=None))  # the case stays here: the report carries what it says
        results.append(result)
        if stop_at_first_failure and result.verdict in ("failed", "error"):
            break
    return SuiteResult(target, seed, profile, results, device=str(described.device), shapes=shapes,
                       declaration=described.declaration.describe())


#: Probing a target (two caches built, then crop, reorder_cache and reset tried) may take this many time limits.
PROBE_CALLS = 8


def describe_target(factory: CacheFactory, name: str, *, time_limit: float | None,
                    device: str | torch.device | None, shapes: str = "default") -> Target:
    """:func:`~kvverify.checks.target.make_target` within ``PROBE_CALLS`` time limits, with a probe that
    hangs, ends the process (``sys.exit``) or interrupts itself answered by a
    :class:`~kvverify.checks.loading.TargetError`."""
    budget = None if time_limit is None else PROBE_CALLS * time_limit
    what = f"probing target {name!r} (two caches built, then crop, reorder_cache and reset tried on a third)"
    try:
        return run_with_time_limit(lambda: make_target(factory, name, time_limit=time_limit, device=device,
                                                           shapes=shapes),
                                   budget, what)
    except (TargetExit, ExampleTimeout) as error:
        raise TargetError(f"target {name!r}: {error}") from None
