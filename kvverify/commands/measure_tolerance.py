"""Measure how far cached and uncached logits drift apart in fast numerics, per device, SDPA backend and dtype.

``kvverify measure-tolerance [--cases N] [--seed S] [--device D] [--backend B ...] [--dtype T ...]`` (or
``python -m kvverify.commands.measure_tolerance``) draws cases from the property suite's strategy (every
positional scheme, norm, window, GQA shape and left padding) in fast numerics, generates with and without a
contiguous cache on the device, once per scaled-dot-product attention backend that applies there, and prints
the largest max-abs logit difference (with the 99th and 99.9th percentile over the cases) and the largest logit
magnitude seen per dtype (``--dtype``: only those drawn). A case a backend cannot run (float64 in flash
attention, a mask where it takes none) is counted as not applicable.
:data:`kvverify.checks.compare.FAST_TOLERANCES` is set from these figures.

``--target MODULE:FACTORY`` measures a lossy cache instead: cases drawn within its declaration (strict numerics,
so every difference is the cache's), generated uncached and with the target's caches; it prints the largest
logit difference per dtype, over the steps where both chose the same tokens, and a ``lossy_atol`` to declare.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvverify.checks import Target


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=400, help="drawn cases per backend (default: 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--backend", nargs="+", choices=("cudnn", "efficient", "flash", "math"),
                        help="SDPA backends to measure (default: every one that applies on the device)")
    parser.add_argument("--dtype", nargs="+", choices=("float64", "float32", "bfloat16", "float16"),
                        help="the dtypes drawn (default: all four)")
    parser.add_argument("--target", metavar="NAME_OR_MODULE:FACTORY",
                        help="measure a lossy cache's largest logit difference instead (strict numerics)")
    parser.add_argument("--shapes", choices=("default", "production"), default="default",
                        help="with --target: the shapes drawn (default: default)")


def run(args: argparse.Namespace) -> int:
    from kvverify.checks import BACKENDS, DeviceError, TargetError, make_target, measure, resolve_device, resolve_target
    from kvverify.commands.exits import EXIT_OK, EXIT_USAGE
    from kvverify.protocol.config import DTYPES

    try:
        device = resolve_device(args.device, option="--device")
        target = None
        if args.target:
            target = make_target(resolve_target(args.target), args.target, device=device, shapes=args.shapes)
    except (DeviceError, TargetError) as error:
        print(f"kvverify measure-tolerance: {error}", file=sys.stderr)
        return EXIT_USAGE
    if target is not None:
        _report_target(target, args.cases, args.seed)
        return EXIT_OK
    dtypes = tuple(args.dtype or DTYPES)
    for backend in args.backend or BACKENDS.get(device.type, ("math",)):
        for dtype, drift in sorted(measure(args.cases, args.seed, device, backend, dtypes).items()):
            skipped = f", {drift.not_applicable} not applicable" if drift.not_applicable else ""
            print(f"{device} {backend:>9} {dtype:>9}: max abs difference {drift.max_abs:.3g} over {drift.cases} "
                  f"cases{skipped} (99% at or under {drift.quantile(0.99):.3g}, 99.9% {drift.quantile(0.999):.3g}; "
                  f"largest |logit| {drift.max_logit:.3g})")
    return EXIT_OK


def _report_target(target: Target, n_cases: int, seed: int) -> None:
    from kvverify.checks import measure_target

    worst = measure_target(target, n_cases, seed)
    for dtype, drift in sorted(worst.items()):
        print(f"{target.name} {dtype:>9}: max abs logit difference {drift.max_abs:.3g} over {drift.cases} cases "
              f"(largest |logit| {drift.max_logit:.3g})")
    largest = max((d.max_abs for d in worst.values()), default=0.0)
    declared = target.declaration.lossy_atol
    print(f"largest difference {largest:.3g}; declared lossy_atol {declared!r}; a margin of 2x: "
          f"CacheDeclaration(lossy_atol={2 * largest:.2g})")


def main(argv: Sequence[str] | None = None) -> int:
    """``kvverify measure-tolerance ...``: the same as ``kvverify measure-tolerance ...``."""
    parser = argparse.ArgumentParser(prog="kvverify measure-tolerance", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
