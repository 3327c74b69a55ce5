"""``kvverify verify [MODULE:FACTORY] [--profile ci|dev|thorough] [--max-examples N] [--seed N] [--junitxml PATH]``.

Without a target it verifies the built-in caches. Exit 0 when every property holds, 1 when one fails,
2 when the command is wrong or the target unusable.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from kvverify.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.settings import PROFILE_EXAMPLES

HELP = "run the property suite against the built-in caches or MODULE:FACTORY"


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
    parser.add_argument("--junitxml", metavar="PATH", help="also write a JUnit XML report")


def _targets(spec: str | None) -> list[tuple[str, object]]:
    from kvverify.caches import BUILTIN_CACHES

    if spec is None:
        return list(BUILTIN_CACHES.items())
    if spec in BUILTIN_CACHES:
        return [(spec, BUILTIN_CACHES[spec])]
    from kvverify.loading import load_factory

    return [(spec, load_factory(spec))]


def run(args: argparse.Namespace) -> int:
    from kvverify.loading import TargetError
    from kvverify.report_table import print_results
    from kvverify.settings import override_examples
    from kvverify.suite import PROPERTIES, run_suite

    if args.max_examples is not None and args.max_examples < 1:
        print(f"kvverify verify: --max-examples must be >= 1; got {args.max_examples}", file=sys.stderr)
        return EXIT_USAGE
    unknown = [p for p in args.properties or [] if p not in PROPERTIES]
    if unknown:
        expected = ", ".join(sorted(PROPERTIES))
        print(f"kvverify verify: unknown property {unknown[0]!r}; expected one of {expected}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    try:
        targets = _targets(args.target)
    except TargetError as error:
        print(f"kvverify verify: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"kvverify verify: profile {args.profile}, seed {seed}", flush=True)
    started = time.perf_counter()
    results = []
    with override_examples(args.profile, args.max_examples):
        for name, factory in targets:
            try:
                result = run_suite(factory, target=name, profile=args.profile, seed=seed,  # type: ignore[arg-type]
                                   properties=args.properties)
            except TargetError as error:
                print(f"kvverify verify: {error}", file=sys.stderr)
                return EXIT_USAGE
            results.append(result)
            print_results(result, command=_reproduce_command(args, name, seed))
    print(f"\n{sum(len(r.results) for r in results)} checks in {time.perf_counter() - started:.1f} s", flush=True)
    if args.junitxml:
        from kvverify.junit import write_junit

        write_junit(results, args.junitxml)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _reproduce_command(args: argparse.Namespace, name: str, seed: int) -> str:
    target = args.target or name
    parts = ["kvverify verify", target, f"--profile {args.profile}", f"--seed {seed}"]
    if args.max_examples is not None:
        parts.append(f"--max-examples {args.max_examples}")
    return " ".join(p for p in parts if p)
