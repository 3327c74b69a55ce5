"""``kvverify profile``: time and memory of every cache, cached vs uncached, against the analytical model.

Writes report.html (self-contained), report.md with its PNGs, and results.json into ``--out``, all at once: into
a temporary folder next to it first, then moved into place (see :mod:`kvverify.profiling.folder`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kvverify.adapters import import_transformers

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats (under 2 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("kvverify-report"), help="folder for the report")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="MODULE:FACTORY",
        help="also profile this cache factory (takes a ModelConfig, returns a cache); repeatable",
    )
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the model and caches live: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for stable timings)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' LlamaForCausalLM and caches")
    parser.add_argument("--engine", choices=("eager", "compiled"), default="eager",
                        help="the reference's decode engine in the ratio rows: eager (DecodeStep) or compiled "
                             "(torch.compile, a CUDA graph on CUDA; times a static cache)")
    parser.add_argument("--preset", metavar="NAME", default=None,
                        help="sweep a real model size instead (1b, 8b: bfloat16, contexts to 32k, batches 1-64; "
                             "GPU only); with --quick, two contexts and two batch sizes")


class StepProgress:
    """The profile's progress on stderr, drawn with rich: a live bar on a terminal; in a log, where a live bar
    would show only at the end, one line per step. Use as a context manager around the run."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, markup=False, emoji=False, highlight=False)
        self.live = self.console.is_terminal
        self.bar = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.live,
        )
        self.task: TaskID | None = None
        self.began = time.perf_counter()

    def __enter__(self) -> StepProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.task is None:
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, completed=done, total=total, description=what)
        if not self.live:
            elapsed = time.perf_counter() - self.began
            self.console.print(f"{done:3d}/{total} {elapsed:6.1f}s {what}")


def run(args: argparse.Namespace) -> int:

    from kvverify.checks import DeviceError, TargetError, make_target, raised_at, resolve_device, resolve_target
    from kvverify.profiling import plan as plans
    from kvverify.profiling.folder import ReportFolderError, prepare, staged
    from kvverify.profiling.report import is_report_file, write_files
    from kvverify.profiling.runner import run_profile
    from kvverify.reference.threads import torch_threads

    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify profile: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads < 1:
        print(f"kvverify profile: --threads must be >= 1; got {args.threads}.", file=sys.stderr)
        return EXIT_USAGE
    if args.preset is not None:
        from kvverify.commands.sweep_report import run_preset

        return run_preset(args, device)
    specs = plans.builtin_specs()
    for target in args.target:
        try:  # refused before anything is measured, as `verify` does: the factory is called and its cache checked
            factory = resolve_target(target)
            make_target(factory, target, device=device)
        except (TargetError, DeviceError) as error:
            print(f"kvverify profile: {error}", file=sys.stderr)
            return EXIT_USAGE
        specs.append(plans.CacheSpec(target, factory, layout=None))
    out_dir: Path = args.out
    try:
        prepare(out_dir)
    except ReportFolderError as error:
        print(f"kvverify profile: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not args.no_transformers:
        try:
            import_transformers()
            specs += plans.transformers_specs()
        except ImportError as error:
            print(f"kvverify profile: transformers' side skipped: {error}", file=sys.stderr)
    chosen = plans.QUICK if args.quick else plans.FULL
    chosen = plans.Plan(**{**vars(chosen), "device": str(device), "engine": args.engine})
    try:  # written next to --out and moved into place at the end: a failure leaves --out as it was
        with staged(out_dir, is_report_file) as stage, torch_threads(args.threads), StepProgress() as progress:
            profile = run_profile(chosen, specs, progress, stage)
            written = write_files(profile, stage)
    except Exception as error:
        print(f"kvverify profile: the profile failed midway ({type(error).__name__}: {error}{raised_at(error)}); "
              f"{out_dir} was left as it was.", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {len(written)} files to {out_dir} in {profile.seconds:.1f} s: report.html, report.md, results.json")
    return EXIT_OK

