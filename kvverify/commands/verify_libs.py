"""``kvverify verify-libs``: the property suite against every real library's cache, in one table.

One row per (library, cache, property): the verdict, examples and seconds, or, where the pair does not apply
(package missing, CUDA needed), one row saying why. A failure that is a known upstream one
(:mod:`kvverify.adapters.known_failures`) is XFAIL; the known failures' fixed examples are rerun and tabled after.
Exit 0 when nothing unexpected happened: no unexpected failure, no known failure fixed (XPASS).
``kvverify verify-hf`` (transformers' own models end to end) stays a command of its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from rich.text import Text

from kvverify.adapters.known import registry
from kvverify.adapters.known_failures import installed_version
from kvverify.adapters.libraries import LIBRARY_CACHES
from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.commands.known import known_failures_table
from kvverify.runs import print_table, table


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("dev", "ci", "thorough"), default="dev",
                        help="Hypothesis profile of each suite run (default: dev)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every suite run (default: 0)")
    parser.add_argument("--max-examples", type=int, default=None, help="cap on examples per property")
    parser.add_argument("--libraries", default="", help="comma-separated libraries to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--junitxml", metavar="PATH", default=None,
                        help="also write a JUnit XML report (a known failure is a skipped testcase saying so)")


def run(args: argparse.Namespace) -> int:
    from kvverify.checks import DeviceError, TargetError, resolve_device, resolve_target
    from kvverify.runs import SuiteResult, run_suite, write_junit

    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify verify-libs: {error}", file=sys.stderr)
        return EXIT_USAGE
    wanted = {name.strip() for name in args.libraries.split(",") if name.strip()}
    known, started, unexpected = registry(), time.perf_counter(), 0
    suites: list[SuiteResult] = []
    rows = table("library", "cache", "property", "verdict", "examples", "seconds", "note",
                 right=("examples", "seconds"))
    for entry in LIBRARY_CACHES:
        if wanted and entry.library not in wanted:
            continue
        version = installed_version(entry.library) or ""
        library = f"{entry.library} {version}".strip()
        why = entry.unavailable(device)
        if why is not None:
            rows.add_row(library, entry.cache, "-", "n/a", "-", "-", why)
            continue
        try:
            result = run_suite(resolve_target(entry.target), target=entry.target, profile=args.profile,
                               seed=args.seed, device=device, max_examples=args.max_examples)
        except (TargetError, DeviceError) as error:
            rows.add_row(library, entry.cache, "-", Text("ERROR", style="bold red"), "-", "-", str(error))
            unexpected += 1
            continue
        reported = []
        for r in result.results:
            verdict, note = {"passed": "PASS", "skipped": "skip"}.get(r.verdict, "FAIL"), ""
            if r.verdict == "skipped":
                note = r.detail
            elif verdict == "FAIL":
                match = known.match(entry.key, r.name, r.detail)
                verdict, note = ("XFAIL", f"known: {match.name}") if match else ("FAIL", r.detail.splitlines()[0])
                unexpected += match is None
                r = replace(r, verdict="skipped", detail=f"XFAIL {note}\n{r.detail}") if match else r
            reported.append(r)
            rows.add_row(library, entry.cache, r.name, verdict, str(r.examples), f"{r.seconds:.1f}", note)
        suites.append(replace(result, target=f"{library} {entry.cache}", results=reported))
    print(f"kvverify verify-libs: profile {args.profile}, seed {args.seed}, device {device}")
    print_table(rows)
    reproductions = known.reproductions()
    print_table(known_failures_table(reproductions))
    unexpected += sum(r.unexpected for r in reproductions)
    print(f"{unexpected} unexpected in {time.perf_counter() - started:.1f} s")
    if args.junitxml:
        write_junit(suites, args.junitxml)
    return EXIT_FAILED if unexpected else EXIT_OK
