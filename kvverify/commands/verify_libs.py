"""``kvverify verify-libs``: the property suite against every real library's cache, in one table.

One row per (library, cache, property): the verdict, examples and seconds, or, where the pair does not apply
(package missing, CUDA needed), one row saying why. A failure that is a known upstream one
(:mod:`kvverify.adapters.known_failures`) is XFAIL; the known failures' fixed examples are rerun and tabled after.
Exit 0 when nothing unexpected happened: no unexpected failure, no known failure fixed (XPASS).
``--json PATH`` writes the rows for ``--merge``, which prints the one table of several environments' runs
(:mod:`kvverify.commands.libs_rows`).
``kvverify verify-hf`` (transformers' own models end to end) stays a command of its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from kvverify.adapters.known import registry
from kvverify.adapters.known_failures import installed_version
from kvverify.adapters.libraries import LIBRARY_CACHES, LibraryCache
from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.commands.libs_rows import (
    KnownRow,
    LibraryRow,
    LibsRun,
    RowsError,
    known_table,
    merge_known,
    read_run,
    rows_table,
)
from kvverify.runs import print_table

if TYPE_CHECKING:
    import torch

    from kvverify.runs import SuiteResult


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("dev", "ci", "thorough"), default="dev",
                        help="Hypothesis profile of each suite run (default: dev)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every suite run (default: 0)")
    parser.add_argument("--max-examples", type=int, default=None, help="cap on examples per property")
    parser.add_argument("--libraries", default="", help="comma-separated libraries to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--junitxml", metavar="PATH", default=None,
                        help="also write a JUnit XML report (a known failure is a skipped testcase saying so)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write this run's rows as JSON, for --merge (one file per environment)")
    parser.add_argument("--merge", metavar="JSON", nargs="+", default=None,
                        help="run nothing: print the one table of several environments' --json files; exit 1 when "
                             "any holds an unexpected verdict")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        return merge(args.merge)
    from kvverify.checks import DeviceError, TargetError, resolve_device, resolve_target
    from kvverify.runs import run_suite, write_junit

    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify verify-libs: {error}", file=sys.stderr)
        return EXIT_USAGE
    wanted = {name.strip() for name in args.libraries.split(",") if name.strip()}
    unknown = wanted - {entry.library for entry in LIBRARY_CACHES}
    if unknown:
        print(f"kvverify verify-libs: --libraries {', '.join(sorted(unknown))}: not a library kvverify adapts; "
              f"expected some of {', '.join(sorted({e.library for e in LIBRARY_CACHES}))}", file=sys.stderr)
        return EXIT_USAGE
    known, started = registry(), time.perf_counter()
    if wanted:  # judge the selected caches' known failures only: another env runs (and judges) the rest
        known = known.only(entry.key for entry in LIBRARY_CACHES if entry.library in wanted)
    suites: list[SuiteResult] = []
    rows: list[LibraryRow] = []
    for entry in LIBRARY_CACHES:
        if wanted and entry.library not in wanted:
            continue
        version = installed_version(entry.library) or ""
        library = f"{entry.library} {version}".strip()
        why = entry.unavailable(device)
        if why is not None:
            rows.append(LibraryRow(library, entry.cache, "-", "n/a", "-", "-", why))
            continue
        try:
            _prepare(entry)
            if entry.checks:  # a cache kvverify cannot hold runs the library's own checks
                result = _own_checks(entry, args, device)
            else:
                result = run_suite(resolve_target(entry.target), target=entry.target, profile=args.profile,
                                   seed=args.seed, device=device, max_examples=args.max_examples)
        except (TargetError, DeviceError) as error:
            rows.append(LibraryRow(library, entry.cache, "-", "ERROR", "-", "-", str(error)))
            continue
        reported = []
        for r in result.results:
            verdict, note = {"passed": "PASS", "skipped": "skip"}.get(r.verdict, "FAIL"), ""
            if r.verdict == "skipped":
                note = r.detail
            elif verdict == "FAIL":
                match = known.match(entry.key, r.name, r.detail)
                verdict, note = ("XFAIL", f"known: {match.name}") if match else ("FAIL", r.detail.splitlines()[0])
                r = replace(r, verdict="skipped", detail=f"XFAIL {note}\n{r.detail}") if match else r
            reported.append(r)
            rows.append(LibraryRow(library, entry.cache, r.name, verdict, str(r.examples), f"{r.seconds:.1f}", note))
        suites.append(replace(result, target=f"{library} {entry.cache}", results=reported))
    done = LibsRun(args.profile, args.seed, str(device), round(time.perf_counter() - started, 1), tuple(rows),
                   tuple(KnownRow.of(r) for r in known.reproductions()))
    print(f"kvverify verify-libs: profile {args.profile}, seed {args.seed}, device {device}")
    _print(done.rows, done.known)
    print(f"{done.unexpected} unexpected in {done.seconds:.1f} s")
    if args.junitxml:
        write_junit(suites, args.junitxml)
    if args.json:
        done.write(args.json)
    return EXIT_FAILED if done.unexpected else EXIT_OK


def _own_checks(entry: LibraryCache, args: argparse.Namespace, device: torch.device) -> SuiteResult:
    """The library's own checks (``entry.checks``); a TargetError when they cannot be loaded or refuse the run."""
    from kvverify.checks import TargetError

    try:
        return entry.own_checks()(profile=args.profile, seed=args.seed, device=device, max_examples=args.max_examples)
    except (ImportError, ValueError) as error:
        raise TargetError(f"{entry.checks}: {error}") from error


def _prepare(entry: LibraryCache) -> None:
    """The library's one-time preparation (``entry.prepare``); a TargetError saying what failed."""
    from kvverify.checks import TargetError

    try:
        entry.prepared()
    except Exception as error:  # a failed build is the row's ERROR, not a crash of the whole table
        raise TargetError(f"prepare {entry.prepare}: {type(error).__name__}: {error}") from error


def merge(paths: list[str]) -> int:
    """The one table of several environments' runs."""
    try:
        runs = [read_run(path) for path in paths]
    except RowsError as error:
        print(f"kvverify verify-libs --merge: {error}", file=sys.stderr)
        return EXIT_USAGE
    for path, r in zip(paths, runs, strict=True):
        print(f"{path}: profile {r.profile}, seed {r.seed}, device {r.device}, {len(r.rows)} rows, "
              f"{r.unexpected} unexpected, {r.seconds:.1f} s ({r.python})")
    rows = [row for r in runs for row in r.rows]
    known = merge_known(runs)
    _print(rows, known)
    unexpected = sum(row.unexpected for row in rows) + sum(k.unexpected for k in known)
    print(f"{unexpected} unexpected in {len(runs)} environments")
    return EXIT_FAILED if unexpected else EXIT_OK


def _print(rows: Sequence[LibraryRow], known: Sequence[KnownRow]) -> None:
    print_table(rows_table(rows))
    print_table(known_table(known))
