"""``kvverify verify-engine ENGINE [--profile ci|dev|thorough] [--max-examples N] [--seed N] [--device cpu]
[--property NAME] [--junitxml PATH] [--repro-script PATH] [--time-limit SECONDS|none] [--no-shrink]
[--mutant NAME]``.

Hypothesis draws schedules of requests, runs them through the serving engine and checks that every request's
tokens and per-step logits equal the request generated alone with no cache, bit for bit (and that a request does
not depend on its neighbours). Exit codes, the table, ``--junitxml`` and ``--repro-script`` are those of
``kvverify verify``; a second table counts the examples that reached each hard path of the engine.

Engines whose kernels kvverify cannot reach (``vllm``: its own C++ attention) are checked within a measured
tolerance instead (:data:`kvverify.engines.registry.TOLERANCE_ENGINES`), with ``--profile``, ``--seed``,
``--max-examples`` and ``--junitxml``; they run in a tox env of their own (``tox -e engine-vllm``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from rich.text import Text

from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.commands.tables import print_results
from kvverify.commands.verify import unwritable
from kvverify.runs import PROFILE_EXAMPLES, print_table, table

if TYPE_CHECKING:
    from rich.table import Table

    from kvverify.engines.runner import EngineResult
    from kvverify.runs import SuiteResult

#: Share of property 1's examples that must reach each hard path (the table marks a shortfall).
MIN_SHARE = 0.10


def configure(parser: argparse.ArgumentParser) -> None:
    from kvverify.engines.registry import ENGINES, TOLERANCE_ENGINES
    from kvverify.engines.runner import ENGINE_EXAMPLES, PROPERTIES

    parser.add_argument("engine", metavar="ENGINE",
                        help=f"the engine to verify: {', '.join([*ENGINES, *TOLERANCE_ENGINES])}")
    parser.add_argument("--profile", choices=sorted(PROFILE_EXAMPLES), default="ci",
                        help="schedules drawn: " + ", ".join(f"{k} {v}" for k, v in ENGINE_EXAMPLES.items())
                        + " (a third as many pairs for independent_of_neighbours)")
    parser.add_argument("--max-examples", type=int, default=None, help="override the profile's schedule count")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (printed when not given)")
    parser.add_argument("--property", action="append", dest="properties", metavar="NAME", choices=PROPERTIES,
                        help=f"run only this property (repeatable): {', '.join(PROPERTIES)}")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the engine runs: cpu (the batch-invariant kernels are CPU-only for now)")
    parser.add_argument("--junitxml", metavar="PATH", help="also write a JUnit XML report")
    parser.add_argument("--repro-script", metavar="PATH", default=None,
                        help="write the first failure as a self-contained Python script that exits 1 while the bug "
                        "is there")
    parser.add_argument("--time-limit", default=None, metavar="SECONDS",
                        help="seconds one example may take before the engine is reported as hanging "
                        "(default: 60; none: no limit)")
    parser.add_argument("--no-shrink", dest="shrink", action="store_false",
                        help="report the first failing schedule as found, unshrunk (each shrinking step is an engine "
                        "run; scripts/engine-mutants only needs the kill)")
    parser.add_argument("--mutant", metavar="NAME", default=None,
                        help="plant this bug into the engine first (see scripts/engine-mutants)")


def run(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        print(f"kvverify verify-engine: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from kvverify.engines.registry import TOLERANCE_ENGINES

    if args.engine in TOLERANCE_ENGINES:
        return _run_within_tolerance(args)
    from kvverify.engines.mutants import get_mutant
    from kvverify.engines.registry import get_engine
    from kvverify.engines.runner import PROPERTIES, run_engine_suite

    engine = get_engine(args.engine)
    mutant = get_mutant(args.mutant) if args.mutant else None
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    planted = f", mutant {mutant.name}" if mutant else ""
    print(f"kvverify verify-engine: {engine.version()}, profile {args.profile}, seed {seed}, device cpu, "
          f"batch-invariant kernels{planted}", flush=True)
    started = time.perf_counter()
    result = run_engine_suite(
        engine, profile=args.profile, seed=seed, max_examples=args.max_examples,
        properties=tuple(args.properties or PROPERTIES), reproduce=_reproduce_command(args, seed),
        shrink=args.shrink, time_limit=_time_limit(args), **({"patch": mutant.planted} if mutant else {}))
    suite = replace(result.suite, declaration=engine.description() + planted, shapes="tiny models (2 layers, d 32)")
    if args.repro_script:
        suite = _with_repro(suite, args)
    print_results(suite)
    print_table(_coverage_table(result))
    print(f"\n{len(suite.results)} properties in {time.perf_counter() - started:.1f} s on cpu", flush=True)
    if args.junitxml:
        from kvverify.runs import write_junit

        try:
            write_junit([suite], args.junitxml)
        except OSError as error:
            print(f"kvverify verify-engine: --junitxml {args.junitxml!r} could not be written: {error}",
                  file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK if suite.ok else EXIT_FAILED


def _run_within_tolerance(args: argparse.Namespace) -> int:
    """An engine of :data:`~kvverify.engines.registry.TOLERANCE_ENGINES`: its own check, the suite's table,
    JUnit and exit codes."""
    import importlib

    from kvverify.engines.registry import TOLERANCE_ENGINES

    module_name, tox_env = TOLERANCE_ENGINES[args.engine]
    check = importlib.import_module(module_name)
    try:
        version = check.engine_version()
    except Exception as error:  # ImportError saying where the engine lives, or the engine's own refusal
        hint = "" if f"tox -e {tox_env}" in str(error) else f" (run it from its tox env: tox -e {tox_env})"
        print(f"kvverify verify-engine: {error}{hint}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"kvverify verify-engine: {version}, profile {args.profile}, seed {seed}, device cpu, within a "
          "measured tolerance", flush=True)
    result = check.run_check(profile=args.profile, seed=seed, max_examples=args.max_examples,
                             on_example=check.progress)
    suite = check.as_suite(result, profile=args.profile, seed=seed, reproduce=_reproduce_command(args, seed))
    print_table(check.format_table(result.rows))
    print_results(suite)
    print(check.summary(result), flush=True)
    if args.junitxml:
        from kvverify.runs import write_junit

        try:
            write_junit([suite], args.junitxml)
        except OSError as error:
            print(f"kvverify verify-engine: --junitxml {args.junitxml!r} could not be written: {error}",
                  file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK if suite.ok else EXIT_FAILED


def _usage_problem(args: argparse.Namespace) -> str | None:
    from kvverify.checks import DeviceError, parse_time_limit, resolve_device
    from kvverify.engines.mutants import MUTANTS
    from kvverify.engines.registry import ENGINES, TOLERANCE_ENGINES

    if args.engine not in ENGINES and args.engine not in TOLERANCE_ENGINES:
        return f"unknown engine {args.engine!r}; expected one of: {', '.join([*ENGINES, *TOLERANCE_ENGINES])}"
    if args.engine in TOLERANCE_ENGINES:
        unsupported = [option for option, given in (("--property", args.properties), ("--mutant", args.mutant),
                                                    ("--repro-script", args.repro_script),
                                                    ("--time-limit", args.time_limit), ("--no-shrink", not args.shrink))
                       if given]
        if unsupported:
            return (f"{', '.join(unsupported)}: not available for {args.engine}, which is checked within a tolerance "
                    "by a check of its own; it takes --profile, --seed, --max-examples and --junitxml")
    if args.mutant is not None and args.mutant not in MUTANTS:
        return f"unknown --mutant {args.mutant!r}; expected one of: {', '.join(MUTANTS)}"
    if args.max_examples is not None and args.max_examples < 1:
        return f"--max-examples must be >= 1; got {args.max_examples}"
    if args.time_limit is not None:
        try:
            parse_time_limit(args.time_limit, "--time-limit")
        except ValueError as error:
            return str(error)
    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        return str(error)
    if device.type != "cpu":
        return (f"--device {args.device}: verify-engine runs the engine under batch-invariant CPU kernels, so on "
                "the CPU only for now; use --device cpu")
    return unwritable(args.junitxml) if args.junitxml else None


def _with_repro(suite: SuiteResult, args: argparse.Namespace) -> SuiteResult:
    from kvverify.engines.repro import write_engine_repro

    for i, r in enumerate(suite.results):
        if r.verdict == "failed" and r.case is not None:
            path = write_engine_repro(args.repro_script, engine=args.engine, prop=r.name, case=r.case,
                                      mutant=args.mutant)
            suite.results[i] = replace(r, detail=f"{r.detail}\nrepro script: python {path}")
            break
    return suite


def _coverage_table(result: EngineResult) -> Table:
    from kvverify.engines.runner import coverage_rows

    rows = table("hard path", "examples", "share", "verdict", right=("examples", "share"))
    for path, count, share in coverage_rows(result):
        verdict = Text("reached", "green") if share >= MIN_SHARE else Text(f"under {MIN_SHARE:.0%}", "yellow")
        rows.add_row(path, f"{count}/{result.examples}", f"{share:.0%}", verdict)
    return rows


def _time_limit(args: argparse.Namespace) -> float | None:
    from kvverify.checks import DEFAULT_TIME_LIMIT, parse_time_limit

    return DEFAULT_TIME_LIMIT if args.time_limit is None else parse_time_limit(args.time_limit, "--time-limit")


def _reproduce_command(args: argparse.Namespace, seed: int) -> str:
    parts = ["kvverify verify-engine", args.engine, f"--profile {args.profile}", f"--seed {seed}"]
    if args.max_examples is not None:
        parts.append(f"--max-examples {args.max_examples}")
    if args.time_limit is not None:
        parts.append(f"--time-limit {args.time_limit}")
    if args.mutant:
        parts.append(f"--mutant {args.mutant}")
    return " ".join(parts)
