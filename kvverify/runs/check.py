""":func:`check_cache`, the suite from Python, in the caller's process or in a child; and the work a child runs
for it, for the plugin's ``--kv-isolate`` (the target probed there too: :func:`describe_isolated`) and for
``kvverify long-context`` (:mod:`kvverify.runs.isolation`)."""

from __future__ import annotations

import functools
import importlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis.database import ExampleDatabase

from kvverify.checks.case import Case
from kvverify.checks.devices import resolve_device
from kvverify.checks.loading import resolve_target
from kvverify.checks.properties import ALL_PROPERTIES
from kvverify.checks.properties.long_context import LONG_CONTEXT
from kvverify.checks.target import Target
from kvverify.checks.watchdog import DEFAULT_TIME_LIMIT, tell
from kvverify.protocol.cache import CacheFactory
from kvverify.runs.database import as_database
from kvverify.runs.isolation import run_in_child, run_isolated
from kvverify.runs.options import check_options
from kvverify.runs.runner import CacheCheckFailed, SuiteResult, describe_target, run_property, run_suite


def check_cache(
    factory: CacheFactory | str,
    *,
    profile: str = "ci",
    seed: int | None = None,
    name: str | None = None,
    max_examples: int | None = None,
    properties: Sequence[str] | str | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    device: str | torch.device | None = None,
    shapes: str = "default",
    database: str | ExampleDatabase | None = None,
    isolate: bool = False,
) -> SuiteResult:
    """Run the property suite against the caches ``factory(config)`` builds; return the result when every
    property holds, else raise :class:`CacheCheckFailed` with every failure's report (where the cache went
    wrong, and the call that reproduces it). An unusable factory raises :class:`~kvverify.checks.loading.TargetError`.

    ``factory``: a callable, a built-in cache's name (``"paged"``) or ``"MODULE:FACTORY"``.
    ``device``: ``"cpu"`` (the default), ``"cuda"``, ``"cuda:N"`` or a torch.device; the models, prompts and
    caches live there. One this machine lacks raises :class:`~kvverify.checks.devices.DeviceError`.
    ``properties``: a property's name or a list of names (None: all). ``time_limit``: seconds per example
    (None: no limit). A wrong profile, property, limit or count raises ValueError naming what is expected.
    ``shapes``: ``"default"`` or ``"production"`` (head_dim 64/128, GQA up to 8, bf16/fp16, contexts to 4096).
    ``database``: as :func:`run_suite`'s (one that cannot be used: :class:`~kvverify.runs.database.DatabaseError`).

    ``isolate=False`` runs the cache in the calling process: a cache that calls ``sys.exit()`` or raises
    ``KeyboardInterrupt`` fails, but one that calls ``os._exit()``, crashes the interpreter, swallows the time
    limit's interrupt in a bare ``except:`` or leaves a non-daemon thread behind takes the caller with it.
    ``isolate=True`` runs it in the child process ``kvverify verify`` uses (in its own process group, killed
    whole): a death or a hang fails the property it happened in, and the properties finished before it keep their
    verdicts. The child imports the factory again, so it must be named: a built-in name, ``"MODULE:FACTORY"``, or
    a module-level function or class (``database``: a directory or URL, not an object).

    >>> import kvverify
    >>> kvverify.check_cache(kvverify.ContiguousCache.from_config, profile="dev")  # doctest: +SKIP
    >>> kvverify.check_cache("mypkg.cache:make_cache", isolate=True)  # doctest: +SKIP
    """
    chosen = check_options(profile=profile, properties=properties, time_limit=time_limit, max_examples=max_examples)
    where = resolve_device(device, option="device=")
    seed = random.randrange(2**32) if seed is None else seed
    spec = factory if isinstance(factory, str) else None
    label = name or spec or str(getattr(factory, "__qualname__", "cache"))
    options = f"profile={profile!r}, seed={seed}" + (f", max_examples={max_examples}" if max_examples else "")
    options += f", device={str(where)!r}" if where.type != "cpu" else ""
    options += f", shapes={shapes!r}" if shapes != "default" else ""
    if isolate:
        options += ", isolate=True"
        if database is not None and not isinstance(database, str):
            raise ValueError("check_cache(isolate=True) opens the database again in the child: pass it as a "
                             f"directory or redis:// URL, not a {type(database).__name__} object.")
        work = functools.partial(suite_in_child, factory_spec(factory), target=label, profile=profile, seed=seed,
                                 time_limit=time_limit, device=str(where), max_examples=max_examples,
                                 shapes=shapes, database=database)
        result = run_isolated(work, target=label, properties=chosen, time_limit=time_limit)
    else:
        callable_factory = resolve_target(factory) if isinstance(factory, str) else factory
        result = run_suite(callable_factory, target=label, profile=profile, seed=seed, properties=properties,
                           time_limit=time_limit, device=where, max_examples=max_examples, shapes=shapes,
                           database=as_database(database))
    shown = repr(spec) if spec is not None else label
    result.results[:] = [
        replace(r, reproduce=f"kvverify.check_cache({shown}, {options}, properties=[{r.name!r}])")
        if r.verdict in ("failed", "error") else r
        for r in result.results
    ]
    if not result.ok:
        raise CacheCheckFailed(result)
    return result


def factory_spec(factory: CacheFactory | str) -> str:
    """The name a child process imports ``factory`` by: the string itself, or ``module:qualname`` of a callable
    that can be found again under that name; else ValueError saying to pass ``"MODULE:FACTORY"``."""
    if isinstance(factory, str):
        return factory
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    spec = f"{module}:{qualname}"
    found: Any = None
    if module and qualname and "<" not in qualname and module != "__main__":
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
    if found is None or found != factory:
        raise ValueError(
            f"check_cache(isolate=True) imports the factory again in a child process, and {factory!r} cannot be "
            "found by its module and name there (a lambda, a closure, a functools.partial or a function defined "
            "in __main__). Pass it as \"MODULE:FACTORY\", with the factory defined at the top level of an "
            "importable module."
        )
    return spec


def suite_in_child(spec: str, *, properties: list[str], target: str, **options: Any) -> SuiteResult:
    """The work of a child process: the suite of ``properties`` against the target ``spec`` names."""
    return run_suite(resolve_target(spec), target=target, properties=properties, **options)


def long_context_in_child(spec: str, case: Case, seed: int, time_limit: float | None, *,
                          properties: list[str]) -> SuiteResult:
    """The work of ``kvverify long-context``'s child: :data:`LONG_CONTEXT` on the one ``case``."""
    from hypothesis import strategies as st

    described = describe_target(resolve_target(spec), spec, time_limit=time_limit, device=None)
    tell("suite", spec, seed, "dev", str(described.device), "default", described.declaration.describe())
    tell("property", LONG_CONTEXT.name)
    prop = replace(LONG_CONTEXT, strategy=lambda _target: st.just(case))
    result = run_property(prop, described, profile="dev", seed=seed, time_limit=time_limit)
    tell("result", replace(result, case=None))
    return SuiteResult(spec, seed, "dev", [result], device=str(described.device), shapes="default",
                       declaration=described.declaration.describe())


@dataclass(frozen=True)
class TargetSummary:
    """What a run needs to know of a target before running its properties, and can carry out of a child:
    the optional methods it has, its declaration (as a constructor call), its device and shapes, and why each
    property that does not apply to it is skipped, by name."""

    capabilities: frozenset[str]
    declaration: str
    device: str
    shapes: str
    skips: dict[str, str]


def summarize(target: Target) -> TargetSummary:
    """The :class:`TargetSummary` of a target described in this process."""
    skips = {name: reason for name, prop in ALL_PROPERTIES.items() if (reason := prop.skip_reason(target))}
    return TargetSummary(frozenset(target.capabilities), target.declaration.describe(), str(target.device),
                         target.shapes, skips)


def describe_isolated(spec: str, *, time_limit: float | None, device: str, shapes: str) -> TargetSummary:
    """The target ``spec`` names, imported and probed in a child process (:func:`run_in_child`), summarized: an
    unusable target, or one that ends or hangs the child while it is probed, raises
    :class:`~kvverify.checks.loading.TargetError`; a device this machine lacks, DeviceError."""
    work = functools.partial(_summary_in_child, spec, time_limit=time_limit, device=device, shapes=shapes)
    return run_in_child(work, target=spec, time_limit=time_limit)


def _summary_in_child(spec: str, *, properties: list[str], time_limit: float | None, device: str,
                      shapes: str) -> TargetSummary:
    return summarize(describe_target(resolve_target(spec), spec, time_limit=time_limit, device=device,
                                     shapes=shapes))
