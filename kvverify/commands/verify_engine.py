"""``kvverify verify-engine ENGINE [--profile ci|dev|thorough] [--max-examples N] [--seed N] [--device cpu]
[--property NAME] [--junitxml PATH] [--repro-script PATH] [--time-limit SECONDS|none] [--no-shrink]
[--mutant NAME]``.

Hypothesis draws schedules of requests, runs them through the serving engine and checks that every request's
tokens and per-step logits equal the request generated alone with no cache: bit for bit under the batch-invariant
kernels (``transformers``, which is also checked for not depending on its neighbours), or within a measured
tolerance with near ties handled as ``verify-hf`` does for an engine whose kernels kvverify cannot reach
(``vllm``: its own C++ attention; it runs in a tox env of its own, ``tox -e engine-vllm``). Exit codes, the
table, ``--junitxml`` and ``--repro-script`` are those of ``kvverify verify``; a second table counts the examples
that reached each hard path of the engine.
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

    from kvverify.engines.adapter import EngineAdapter
    from kvverify.engines.runner import EngineResult
    from kvverify.runs import SuiteResult

#: Share of property 1's examples that must reach each hard path (the table marks a shortfall).
MIN_SHARE = 0.10


def configure(parser: argparse.ArgumentParser) -> None:
    from kvverify.engines.registry import ENGINES, get_engine
    from kvverify.engines.runner import PROPERTIES

    counts = "; ".join(f"{name} " + ", ".join(f"{k} {v}" for k, v in get_engine(name).examples.items())
                       for name in ENGINES)
    parser.add_argument("engine", metavar="ENGINE", help=f"the engine to verify: {', '.join(ENGINES)}")
    parser.add_argument("--profile", choices=sorted(PROFILE_EXAMPLES), default="ci",
                        help=f"schedules drawn: {counts} (a third as many pairs for independent_of_neighbours)")
    parser.add_argument("--max-examples", type=int, default=None, help="override the profile's schedule count")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (printed when not given)")
    parser.add_argument("--property", action="append", dest="properties", metavar="NAME", choices=PROPERTIES,
                        help=f"run only this property (repeatable): {', '.join(PROPERTIES)} (vllm: matches_alone)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the engine runs: cpu (the batch-invariant kernels are CPU-only for now)")
    parser.add_argument("--junitxml", metavar="PATH", help="also write a JUnit XML report")
    parser.add_argument("--repro-script", metavar="PATH", default=None,
                        help="write the first failure as a self-contained Python script that exits 1 while the bug "
                        "is there")
    parser.add_argument("--time-limit", default=None, metavar="SECONDS",
                        help="seconds one example may take before the engine is reported as hanging "
                        "(default: transformers 60, vllm 300; none: no limit)")
    parser.add_argument("--no-shrink", dest="shrink", action="store_false",
                        help="report the first failing schedule as found, unshrunk (each shrinking step is an engine "
                        "run; scripts/engine-mutants only needs the kill)")
    parser.add_argument("--mutant", metavar="NAME", default=None,
                        help="plant this bug into transformers' engine first (see scripts/engine-mutants)")


def run(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        print(f"kvverify verify-engine: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from kvverify.engines.mutants import get_mutant
    from kvverify.engines.registry import TOX_ENVS, get_engine
    from kvverify.engines.runner import run_engine_suite

    engine = get_engine(args.engine)
    try:
        version = engine.version()
    except Exception as error:  # ImportError saying where the engine lives, or its refusal to load here
        env = TOX_ENVS.get(args.engine)
        hint = f" (run it from its tox env: tox -e {env})" if env and f"tox -e {env}" not in str(error) else ""
        print(f"kvverify verify-engine: {error}{hint}", file=sys.stderr)
        return EXIT_USAGE
    mutant = get_mutant(args.mutant) if args.mutant else None
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    planted = f", mutant {mutant.name}" if mutant else ""
    compared = ("batch-invariant kernels" if engine.oracle.atol is None
                else f"within {engine.oracle.atol:g} of the strict reference")
    print(f"kvverify verify-engine: {version}, profile {args.profile}, seed {seed}, device cpu, {compared}{planted}",
          flush=True)
    started = time.perf_counter()
    result = run_engine_suite(
        engine, profile=args.profile, seed=seed, max_examples=args.max_examples,
        properties=tuple(args.properties) if args.properties else None, reproduce=_reproduce_command(args, seed),
        shrink=args.shrink, time_limit=_time_limit(args, engine), **({"patch": mutant.planted} if mutant else {}))
    suite = replace(result.suite, declaration=engine.description() + planted, shapes=_shapes(engine))
    if args.repro_script:
        suite = _with_repro(suite, args)
    print_results(suite)
    print_table(_coverage_table(result))
    if engine.oracle.atol is not None:
        largest = "none (no example passed)" if result.largest_difference is None else \
            f"{result.largest_difference:.3g}"
        print(f"\nlargest logit difference {largest} (tolerance {engine.oracle.atol:g}); near ties: "
              f"{result.near_ties}", flush=True)
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


def _shapes(engine: EngineAdapter) -> str:
    return "tiny models (2 layers, d 32)" if engine.oracle.atol is None else "the reference model (2 layers, d 128)"


def _usage_problem(args: argparse.Namespace) -> str | None:
    from kvverify.checks import DeviceError, parse_time_limit, resolve_device
    from kvverify.engines.mutants import ENGINE as MUTANTS_ENGINE
    from kvverify.engines.mutants import MUTANTS
    from kvverify.engines.registry import ENGINES, get_engine

    if args.engine not in ENGINES:
        return f"unknown engine {args.engine!r}; expected one of: {', '.join(ENGINES)}"
    checked = get_engine(args.engine).properties
    refused = [name for name in args.properties or () if name not in checked]
    if refused:
        return (f"--property {refused[0]}: not checked for {args.engine}, whose kernels are not batch-invariant (a "
                f"request's bits may change with its neighbours); it takes {', '.join(checked)}")
    if args.mutant is not None and args.engine != MUTANTS_ENGINE:
        return f"--mutant: the planted bugs patch {MUTANTS_ENGINE}' engine; there are none for {args.engine}"
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
        return (f"--device {args.device}: verify-engine runs on the CPU only for now (transformers under the "
                "batch-invariant CPU kernels, vLLM's CPU build); use --device cpu")
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


def _time_limit(args: argparse.Namespace, engine: EngineAdapter) -> float | None:
    from kvverify.checks import parse_time_limit

    return engine.time_limit if args.time_limit is None else parse_time_limit(args.time_limit, "--time-limit")


def _reproduce_command(args: argparse.Namespace, seed: int) -> str:
    parts = ["kvverify verify-engine", args.engine, f"--profile {args.profile}", f"--seed {seed}"]
    if args.max_examples is not None:
        parts.append(f"--max-examples {args.max_examples}")
    if args.time_limit is not None:
        parts.append(f"--time-limit {args.time_limit}")
    if args.mutant:
        parts.append(f"--mutant {args.mutant}")
    return " ".join(parts)
