"""``kvverify profile``: time and memory of every cache, cached vs uncached, against the analytical model.

Writes report.html (self-contained), report.md with its PNGs, and results.json into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvverify.adapters import import_transformers

HELP = "measure time and memory of every cache: report.html, .md, .json"

EXIT_OK, EXIT_USAGE = 0, 2


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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model and caches live")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for stable timings)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' LlamaForCausalLM and caches")


class TextProgress:
    """A plain-text progress bar on stderr: one line per step."""

    def __init__(self, width: int = 30) -> None:
        self.width, self.began = width, time.perf_counter()

    def __call__(self, done: int, total: int, what: str) -> None:
        filled = self.width * done // max(total, 1)
        elapsed = time.perf_counter() - self.began
        bar = "#" * filled + "." * (self.width - filled)
        print(f"[{bar}] {done:3d}/{total} {elapsed:6.1f}s {what}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from kvverify.profiling import plan as plans
    from kvverify.profiling.report import write_report
    from kvverify.profiling.runner import run_profile
    from kvverify.suite.loading import TargetError, load_factory

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "kvverify profile: --device cuda asked for, but torch.cuda.is_available() is False; "
            "use --device cpu or a CUDA build of torch on a machine with a GPU.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.threads < 1:
        print(f"kvverify profile: --threads must be >= 1; got {args.threads}.", file=sys.stderr)
        return EXIT_USAGE
    specs = plans.builtin_specs()
    for target in args.target:
        try:
            specs.append(plans.CacheSpec(target, load_factory(target), layout=None))
        except TargetError as error:
            print(f"kvverify profile: {error}", file=sys.stderr)
            return EXIT_USAGE
    if not args.no_transformers:
        try:
            import_transformers()
            specs += plans.transformers_specs()
        except ImportError as error:
            print(f"kvverify profile: transformers' side skipped: {error}", file=sys.stderr)
    chosen = plans.QUICK if args.quick else plans.FULL
    chosen = plans.Plan(**{**vars(chosen), "device": args.device})
    torch.set_num_threads(args.threads)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = run_profile(chosen, specs, TextProgress(), out_dir)
    written = write_report(profile, out_dir)
    print(f"wrote {len(written)} files to {out_dir} in {profile.seconds:.1f} s: report.html, report.md, results.json")
    return EXIT_OK
