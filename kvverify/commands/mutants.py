"""``kvverify mutants``: the property suite against the catalogue of buggy caches, with a kill table.

Every mutant of :data:`kvverify.mutants.MUTANTS` runs through the suite; a mutant is killed when some
property fails (or errors) on it. The correct built-in caches, and transformers' ``DynamicCache`` and
``StaticCache`` when transformers is installed, run as controls and must pass, except for the known upstream
failures of :mod:`kvverify.adapters.known_failures` (XFAIL), whose fixed examples are rerun and tabled every time. The
conventional grid of :mod:`kvverify.mutants.baseline` runs against the same mutants for comparison. Exit 0 only
when every mutant is killed, every control failure is a known one, and every known one still reproduces.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from rich.text import Text

from kvverify.adapters import import_transformers
from kvverify.adapters.hf import CACHES
from kvverify.commands.known import known_failures_table
from kvverify.protocol.cache import CacheFactory
from kvverify.runs import PropertyResult, print_table, table

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: transformers' caches, by their name in kvverify.adapters.hf.CACHES, that run as controls: generate()'s
#: default cache and the preallocated one.
TRANSFORMERS_CONTROLS = ("dynamic", "static")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("ci", "dev", "thorough"), default="ci",
                        help="Hypothesis profile of the suite (default: ci)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every suite run (default: 0)")
    parser.add_argument("--only", nargs="+", metavar="MUTANT", help="run only these mutants (and the controls)")
    parser.add_argument("--no-controls", action="store_true", help="skip the correct caches")
    parser.add_argument("--no-baseline", action="store_true", help="skip the conventional grid")
    parser.add_argument("--details", action="store_true", help="print each killing property's full report")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the models, prompts and caches live: cpu, cuda or cuda:N (default: cpu)")


@dataclass(frozen=True)
class Row:
    """One mutant's outcome under the suite and under the baseline grid."""

    name: str
    killed: bool
    killer: str  # the first property that failed, or "" when none did
    first_failure_seconds: float | None
    cpu_seconds: float
    example: str  # the shrunk failing case, on one line
    detail: str
    baseline_killed: bool | None  # None when the baseline was not run
    baseline_cpu_seconds: float


def _minimal_case(detail: str, width: int = 160) -> str:
    """The shrunk example of a failure report on one line, the model config reduced to its telling fields."""
    lines = detail.splitlines()
    if "minimal case:" not in lines:
        return ""
    parts = []
    for line in lines[lines.index("minimal case:") + 1 :]:
        if not line.strip():
            break
        line = line.strip()
        if line.startswith("config: ModelConfig("):
            fields = dict(re.findall(r"(\w+)=('[^']*'|[^,)]+)", line))
            keep = ("n_layers", "n_heads", "n_kv_heads", "sliding_window", "dtype", "positional")
            line = "config: " + " ".join(f"{k}={fields[k].strip(chr(39))}" for k in keep if k in fields)
        parts.append(line)
    text = "; ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def _controls() -> dict[str, CacheFactory]:
    from kvverify.caches import BUILTIN_CACHES
    from kvverify.mutants.boundaries import CONTROLS as BOUNDARY_CONTROLS

    controls: dict[str, CacheFactory] = {**BUILTIN_CACHES, **BOUNDARY_CONTROLS}
    try:
        import_transformers()
    except ImportError:  # transformers is optional: its caches are controls only when installed
        return controls
    for name in TRANSFORMERS_CONTROLS:
        factory = CACHES[name].target
        assert factory is not None, f"kvverify.adapters.hf.CACHES[{name!r}] has no target to run as a control"
        controls[f"transformers-{name}"] = factory
    return controls


def _run_mutant(name: str, factory: CacheFactory, profile: str, seed: int, with_baseline: bool,
                device: torch.device) -> Row:
    from kvverify.mutants.baseline import run_baseline
    from kvverify.runs import run_suite

    start = time.process_time()
    result = run_suite(factory, target=f"mutant:{name}", profile=profile, seed=seed, stop_at_first_failure=True,
                       device=device, properties=_properties())
    cpu = time.process_time() - start
    failure = result.failures[0] if result.failures else None
    baseline = run_baseline(factory, device=device) if with_baseline else None
    return Row(
        name=name,
        killed=failure is not None,
        killer=failure.name if failure else "",
        first_failure_seconds=_time_to_kill(result.results),
        cpu_seconds=cpu,
        example=_minimal_case(failure.detail) if failure else "",
        detail=failure.detail if failure else "",
        baseline_killed=baseline.killed if baseline else None,
        baseline_cpu_seconds=baseline.cpu_seconds if baseline else 0.0,
    )


def _rows(names: Sequence[str], profile: str, seed: int, with_baseline: bool, device: torch.device,
          isolate: bool | None = None) -> Iterator[Row]:
    """Each mutant's row, in order. On the CPU in this process; on a GPU (``isolate`` None) each mutant runs in a
    fresh process, a few at a time: a mutant that indexes out of bounds trips a device-side assert, which leaves
    the process's CUDA context unusable for every mutant after it."""
    if not (device.type != "cpu" if isolate is None else isolate):
        for name in names:
            yield _run_mutant_named(name, profile, seed, with_baseline, device)
        return
    context = multiprocessing.get_context("spawn")  # a CUDA context does not survive fork
    with context.Pool(processes=_WORKERS, maxtasksperchild=1) as pool:
        jobs = [pool.apply_async(_run_mutant_named, (name, profile, seed, with_baseline, device)) for name in names]
        for job in jobs:
            yield job.get()


#: Mutants run at once on a GPU, each in its own process.
_WORKERS = 4


def _run_mutant_named(name: str, profile: str, seed: int, with_baseline: bool, device: torch.device) -> Row:
    from kvverify.mutants import MUTANTS

    return _run_mutant(name, MUTANTS[name].factory, profile, seed, with_baseline, device)


def _properties() -> list[str]:
    """The default properties, then the opt-in ones (the long context): bugs that show only there count too."""
    from kvverify.checks import OPT_IN_PROPERTIES, PROPERTIES

    return [*PROPERTIES, *OPT_IN_PROPERTIES]


def _time_to_kill(results: Sequence[PropertyResult]) -> float | None:
    """Seconds from the start of the suite to the first failing example: the properties that passed before
    the killer, then the killer up to its first failure."""
    for index, result in enumerate(results):
        if result.verdict in ("failed", "error"):
            before = sum(r.seconds for r in results[:index])
            first = result.first_failure_seconds
            return before + (first if first is not None else result.seconds)
    return None


def _print_table(rows: Sequence[Row], with_baseline: bool) -> None:
    headers = ["mutant", "suite", "killed by", "to fail"] + (["baseline"] if with_baseline else [])
    kills = table(*headers, "shrunk example", right=("to fail",))
    for r in rows:
        to_fail = f"{r.first_failure_seconds:.1f}s" if r.first_failure_seconds is not None else "-"
        suite = Text("killed") if r.killed else Text("SURVIVED", style="bold red")
        baseline = ["killed" if r.baseline_killed else "survived"] if with_baseline else []
        kills.add_row(r.name, suite, r.killer, to_fail, *baseline, r.example)
    print_table(kills)


def run(args: argparse.Namespace) -> int:
    from kvverify.checks import DeviceError, describe_device, resolve_device
    from kvverify.mutants import MUTANTS

    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify mutants: {error}", file=sys.stderr)
        return EXIT_USAGE
    names = list(MUTANTS) if not args.only else list(args.only)
    unknown = [name for name in names if name not in MUTANTS]
    if unknown:
        print(f"unknown mutant(s) {unknown}; expected some of: {', '.join(MUTANTS)}")
        return EXIT_USAGE
    with_baseline = not args.no_baseline

    print(f"kvverify mutants: profile {args.profile}, seed {args.seed}, device {describe_device(device)}", flush=True)
    rows = []
    for row in _rows(names, args.profile, args.seed, with_baseline, device):
        rows.append(row)
        print(f"  {row.name}: {'killed by ' + row.killer if row.killed else 'survived'}", flush=True)
    print()
    _print_table(rows, with_baseline)
    if args.details:
        for r in rows:
            if r.killed:
                print(f"\n[{r.name}] killed by {r.killer}\n{r.detail}")

    killed = sum(r.killed for r in rows)
    suite_cpu = sum(r.cpu_seconds for r in rows)
    print(f"\nsuite ({args.profile} profile, seed {args.seed}, {device}): killed {killed}/{len(rows)} "
          f"in {suite_cpu:.1f} CPU seconds")
    failing_times = sorted(r.first_failure_seconds for r in rows if r.first_failure_seconds is not None)
    if failing_times:
        median = failing_times[len(failing_times) // 2]
        print(f"  time to first failure: median {median:.1f}s, max {failing_times[-1]:.1f}s")
    if with_baseline:
        baseline_killed = sum(bool(r.baseline_killed) for r in rows)
        baseline_cpu = sum(r.baseline_cpu_seconds for r in rows)
        print(f"baseline (transformers-style grid): killed {baseline_killed}/{len(rows)} "
              f"in {baseline_cpu:.1f} CPU seconds")

    controls_ok = True
    if not args.no_controls:
        controls_ok = _run_controls(args, device)

    survivors = [r.name for r in rows if not r.killed]
    if survivors:
        print(f"\nsurvived: {', '.join(survivors)}")
    return EXIT_OK if not survivors and controls_ok else EXIT_FAILED


def _run_controls(args: argparse.Namespace, device: torch.device) -> bool:
    """Run the correct caches through the suite; True when every failure is a known upstream one (XFAIL) and
    every known failure's fixed example still reproduces (no XPASS)."""
    from kvverify.adapters.known import registry
    from kvverify.runs import run_suite

    known = registry()
    ok = True
    print("\ncontrols (correct caches; every property must pass, but for known upstream failures):")
    for name, factory in _controls().items():
        result = run_suite(factory, target=f"control:{name}", profile=args.profile, seed=args.seed, device=device,
                           properties=_properties())
        expected = {f.name: known.match(name, f.name, f.detail) for f in result.failures}
        unexpected = [f for f in result.failures if expected[f.name] is None]
        ok &= not unexpected
        verdicts = [f"FAILED: {f.name}" for f in unexpected]
        verdicts += [f"XFAIL: {prop} (known: {entry.name})" for prop, entry in expected.items() if entry]
        print(f"  {name:<24} {'; '.join(verdicts) or 'passed'}")
        if args.details:
            for failure in result.failures:
                print(f"\n[{name}] {failure.name}\n{failure.detail}")
    reproductions = known.reproductions()
    print_table(known_failures_table(reproductions))
    ok &= not any(r.unexpected for r in reproductions)
    return ok
