"""``kvverify verify [MODULE:FACTORY] [--profile ci|dev|thorough] [--max-examples N] [--seed N] [--device D]
[--shapes default|production] [--junitxml PATH]
[--repro-script PATH] [--time-limit SECONDS|none] [--in-process] [--database DIR|redis://HOST:PORT[/DB]]
[--shard I/N]``.

Without a target it verifies the built-in caches. Exit 0 when every property holds, 1 when a property or the
contract fails, 2 when the command is wrong or the target unusable. Every failure prints the one-line command
that reproduces it: the same seed, profile and example count run the same examples.

Each target runs in a child process (:mod:`kvverify.runs.isolation`) that gets every option of the command:
:func:`suite_for` is where they reach :func:`~kvverify.runs.run_suite`. A target that ends, crashes or hangs
that process fails the property it was running; it cannot end or hang this one.

``--database`` keeps failing examples (:mod:`kvverify.runs.database`): the next run replays them first, whatever
its seed. ``--shard I/N`` runs one N-th of the (target, property) pairs (:mod:`kvverify.runs.shards`), so N CI
jobs run the whole suite between them.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from kvverify.checks import SHAPES
from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.commands.tables import print_results
from kvverify.runs import PROFILE_EXAMPLES, DatabaseError, describe_database

if TYPE_CHECKING:
    import torch

    from kvverify.runs import SuiteResult


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        help="MODULE:FACTORY, where FACTORY(config) returns a fresh cache, or a built-in cache name "
        "(default: every built-in cache)",
    )
    parser.add_argument("--profile", choices=sorted(PROFILE_EXAMPLES), default="ci",
                        help="examples per property: " + ", ".join(f"{k} {v}" for k, v in PROFILE_EXAMPLES.items()))
    parser.add_argument("--max-examples", type=int, default=None, help="override the profile's examples per property")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (printed when not given)")
    parser.add_argument("--property", action="append", dest="properties", metavar="NAME",
                        help="run only this property (repeatable)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the models, prompts and caches live: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--shapes", choices=SHAPES, default="default",
                        help="default: toy models (fast, for CI); production: head_dim 64/128, GQA up to 8, "
                        "bf16/fp16, blocks of 16, contexts to 4096 (default: default)")
    parser.add_argument("--junitxml", metavar="PATH", help="also write a JUnit XML report")
    parser.add_argument("--repro-script", metavar="PATH", default=None,
                        help="write the first failure as a self-contained Python script that exits 1 while the bug "
                        "is there")
    parser.add_argument("--time-limit", default=None, metavar="SECONDS",
                        help="seconds one example may take before the cache is reported as hanging "
                        "(default: 60, 300 at --shapes production; none: no limit)")
    parser.add_argument("--database", metavar="DIR|URL", default=None,
                        help="keep failing examples in this directory (created when missing), or in a Redis server "
                        "shared by CI jobs: redis://HOST:PORT[/DB] (needs kvverify[redis]); the next run replays "
                        "them first, whatever its seed (default: no database)")
    parser.add_argument("--shard", metavar="I/N", default=None,
                        help="run shard I of N: the (target, property) pairs split over N CI jobs that run the same "
                        "command with I = 1..N; every pair runs in exactly one shard")
    parser.add_argument("--in-process", action="store_true",
                        help="run the target in this process, for a debugger (a target that exits, crashes or "
                        "swallows the time limit then ends or hangs the run)")


def _target_names(spec: str | None) -> list[str]:
    """The built-in caches' names without a target; else the target (loaded where its suite runs)."""
    from kvverify.caches import BUILTIN_CACHES

    return list(BUILTIN_CACHES) if spec is None else [spec]


def planned_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (target, property) pairs the command runs, before any ``--shard``: every target with the properties
    asked for, or the profile's own (thorough adds long_context)."""
    from kvverify.runs import check_options

    names = check_options(profile=args.profile, properties=args.properties, time_limit=None, max_examples=None)
    return [(target, name) for target in _target_names(args.target) for name in names]


def shard_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The pairs this command runs: :func:`planned_pairs`, or this ``--shard``'s part of them (each weighed by
    what its examples are expected to cost, so that the shards take about as long)."""
    from kvverify.runs import expected_cost, parse_shard

    pairs = planned_pairs(args)
    if args.shard is None:
        return pairs
    return parse_shard(args.shard).pick(
        pairs, weight=lambda pair: expected_cost(args.profile, pair[1], max_examples=args.max_examples))


def run(args: argparse.Namespace) -> int:
    from kvverify.checks import ALL_PROPERTIES, DeviceError, TargetError, describe_device, resolve_device

    problem = _usage_problem(args, ALL_PROPERTIES)
    if problem:
        print(f"kvverify verify: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify verify: {error}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    shapes = f", shapes {args.shapes}" if args.shapes != "default" else ""
    pairs = shard_pairs(args)
    shard = f", shard {_shard_label(args)}: {len(pairs)} of {len(planned_pairs(args))} (target, property) pairs" \
        if args.shard else ""
    database = f", database {describe_database(args.database)}" if args.database else ""
    print(f"kvverify verify: profile {args.profile}, seed {seed}, device {describe_device(device)}{shapes}{shard}"
          f"{database}", flush=True)
    started = time.perf_counter()
    results = []
    for name in _target_names(args.target):
        properties = [prop for target, prop in pairs if target == name]
        if not properties:  # this shard has none of the target's properties
            continue
        try:
            result = _run_target(args, name, seed, device, properties)
        except (TargetError, DeviceError, DatabaseError) as error:
            print(f"kvverify verify: {error}", file=sys.stderr)
            return EXIT_USAGE
        results.append(result)
        print_results(result, shard=_shard_label(args))
    print(f"\n{sum(len(r.results) for r in results)} checks in {time.perf_counter() - started:.1f} s on {device}"
          + (f" (shard {_shard_label(args)})" if args.shard else ""), flush=True)
    if args.junitxml:
        from kvverify.runs import write_junit

        try:
            write_junit(results, args.junitxml, shard=_shard_label(args))
        except OSError as error:
            print(f"kvverify verify: --junitxml {args.junitxml!r} could not be written: {error}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _run_target(args: argparse.Namespace, name: str, seed: int, device: torch.device,
                properties: list[str]) -> SuiteResult:
    """The target's suite, in a child process unless ``--in-process``."""
    if args.in_process:
        return suite_for(args, name, seed, device, properties=properties)
    from kvverify.runs import run_isolated

    work = functools.partial(suite_for, args, name, seed, device)
    return run_isolated(work, target=name, properties=properties, time_limit=_time_limit(args),
                        reproduce=_reproduce_command(args, name, seed))


def suite_for(args: argparse.Namespace, name: str, seed: int, device: torch.device, *,
              properties: list[str]) -> SuiteResult:
    """One target's suite with the command's options; where it runs, the target is loaded and run. An option
    that changes the run reaches run_suite here, and so the child process."""
    from kvverify.checks import resolve_target
    from kvverify.runs import run_suite

    return run_suite(resolve_target(name), target=name, profile=args.profile, seed=seed, properties=properties,
                     time_limit=_time_limit(args), reproduce=_reproduce_command(args, name, seed),
                     max_examples=args.max_examples, device=device, repro_script=args.repro_script,
                     shapes=args.shapes, database=getattr(args, "database", None))


def _usage_problem(args: argparse.Namespace, properties: Collection[str]) -> str | None:
    """What is wrong with the command's options (checked before anything runs), or None."""
    from kvverify.checks import parse_time_limit
    from kvverify.runs import ShardError, open_database, parse_shard

    if args.max_examples is not None and args.max_examples < 1:
        return f"--max-examples must be >= 1; got {args.max_examples}"
    unknown = [p for p in args.properties or [] if p not in properties]
    if unknown:
        return f"unknown property {unknown[0]!r}; expected one of {', '.join(sorted(properties))}"
    if args.time_limit is not None:
        try:
            parse_time_limit(args.time_limit, "--time-limit")
        except ValueError as error:
            return str(error)
    if args.shard is not None:
        try:
            parse_shard(args.shard)
        except ShardError as error:
            return str(error)
    if args.database is not None:
        try:
            open_database(args.database)  # a directory is created, a Redis server asked for a PING
        except DatabaseError as error:
            return f"--{error}"
    return unwritable(args.junitxml) if args.junitxml else None


def _shard_label(args: argparse.Namespace) -> str | None:
    from kvverify.runs import parse_shard

    return str(parse_shard(args.shard)) if args.shard else None


def unwritable(path: str) -> str | None:
    """Why a report cannot be written at ``path``, or None (a file it creates to find out is removed)."""
    report = Path(path)
    if report.is_dir():
        return (f"--junitxml {path!r} is a directory; expected the path of the XML file to write, e.g. "
                f"{str(report / 'kvverify.xml')!r}")
    existed = report.exists()
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        with report.open("a"):
            pass
    except OSError as error:
        return (f"--junitxml {path!r} cannot be written ({error.strerror or error}); expected a file path in a "
                "writable directory: choose another path or fix the permissions")
    if not existed:
        report.unlink()
    return None


def _time_limit(args: argparse.Namespace) -> float | None:
    from kvverify.checks import default_time_limit, parse_time_limit

    if args.time_limit is None:
        return default_time_limit(getattr(args, "shapes", "default"))
    return parse_time_limit(args.time_limit, "--time-limit")


def _reproduce_command(args: argparse.Namespace, name: str, seed: int) -> str:
    """The command that runs the same examples again (``--property NAME`` is added per failure)."""
    parts = ["kvverify verify", args.target or name, f"--profile {args.profile}", f"--seed {seed}"]
    if args.max_examples is not None:
        parts.append(f"--max-examples {args.max_examples}")
    if args.time_limit is not None:
        limit = _time_limit(args)
        parts.append(f"--time-limit {'none' if limit is None else format(limit, 'g')}")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if getattr(args, "shapes", "default") != "default":
        parts.append(f"--shapes {args.shapes}")
    if getattr(args, "database", None):  # the failure may have been a replay from the database, not the seed's
        parts.append(f"--database {describe_database(args.database)}")
    return " ".join(parts)
