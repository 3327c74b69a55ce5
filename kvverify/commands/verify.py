"""``kvverify verify [MODULE:FACTORY] [--profile ci|dev|thorough] [--max-examples N] [--seed N] [--device D]
[--shapes default|production] [--junitxml PATH]``.

Without a target it verifies the built-in caches. Exit 0 when every property holds, 1 when a property or the
contract fails, 2 when the command is wrong or the target unusable. Every failure prints the one-line command
that reproduces it: the same seed, profile and example count run the same examples.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from kvverify.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.commands.tables import print_results
from kvverify.suite.settings import PROFILE_EXAMPLES
from kvverify.suite.shapes import SHAPES


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
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="seconds one example may take before the cache is reported as hanging "
                        "(default: 60)")


def _targets(spec: str | None) -> list[tuple[str, object]]:
    from kvverify.caches import BUILTIN_CACHES

    if spec is None:
        return list(BUILTIN_CACHES.items())
    if spec in BUILTIN_CACHES:
        return [(spec, BUILTIN_CACHES[spec])]
    from kvverify.suite.loading import load_factory

    return [(spec, load_factory(spec))]


def run(args: argparse.Namespace) -> int:
    from kvverify.suite import PROPERTIES, run_suite
    from kvverify.suite.devices import DeviceError, describe_device, resolve_device
    from kvverify.suite.loading import TargetError

    if args.max_examples is not None and args.max_examples < 1:
        print(f"kvverify verify: --max-examples must be >= 1; got {args.max_examples}", file=sys.stderr)
        return EXIT_USAGE
    unknown = [p for p in args.properties or [] if p not in PROPERTIES]
    if unknown:
        expected = ", ".join(sorted(PROPERTIES))
        print(f"kvverify verify: unknown property {unknown[0]!r}; expected one of {expected}", file=sys.stderr)
        return EXIT_USAGE
    if args.time_limit is not None and args.time_limit <= 0:
        print(f"kvverify verify: --time-limit must be > 0 seconds; got {args.time_limit}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify verify: {error}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    try:
        targets = _targets(args.target)
    except TargetError as error:
        print(f"kvverify verify: {error}", file=sys.stderr)
        return EXIT_USAGE
    shapes = f", shapes {args.shapes}" if args.shapes != "default" else ""
    print(f"kvverify verify: profile {args.profile}, seed {seed}, device {describe_device(device)}{shapes}", flush=True)
    started = time.perf_counter()
    results = []
    for name, factory in targets:
        try:
            result = run_suite(factory, target=name, profile=args.profile, seed=seed,  # type: ignore[arg-type]
                               properties=args.properties, time_limit=_time_limit(args),
                               reproduce=_reproduce_command(args, name, seed), max_examples=args.max_examples,
                               device=device, shapes=args.shapes)
        except TargetError as error:
            print(f"kvverify verify: {error}", file=sys.stderr)
            return EXIT_USAGE
        results.append(result)
        print_results(result)
    print(f"\n{sum(len(r.results) for r in results)} checks in {time.perf_counter() - started:.1f} s on {device}",
          flush=True)
    if args.junitxml:
        from kvverify.suite.junit import write_junit

        write_junit(results, args.junitxml)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _time_limit(args: argparse.Namespace) -> float:
    from kvverify.suite.watchdog import DEFAULT_TIME_LIMIT

    return float(args.time_limit) if args.time_limit is not None else DEFAULT_TIME_LIMIT


def _reproduce_command(args: argparse.Namespace, name: str, seed: int) -> str:
    """The command that runs the same examples again (``--property NAME`` is added per failure)."""
    parts = ["kvverify verify", args.target or name, f"--profile {args.profile}", f"--seed {seed}"]
    if args.max_examples is not None:
        parts.append(f"--max-examples {args.max_examples}")
    if args.time_limit is not None:
        parts.append(f"--time-limit {args.time_limit:g}")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if getattr(args, "shapes", "default") != "default":
        parts.append(f"--shapes {args.shapes}")
    return " ".join(parts)
