"""Measure how far cached and uncached logits drift apart in fast numerics, per device, SDPA backend and dtype.

``python -m kvverify.commands.measure_tolerance [--cases N] [--seed S] [--device D] [--backend B ...]`` draws
cases from the property suite's strategy (every positional scheme, norm, window, GQA shape and left padding) in
fast numerics, generates with and without a contiguous cache on the device, once per scaled-dot-product attention
backend that applies there, and prints the largest max-abs logit difference and the largest logit magnitude seen
per dtype. A case a backend cannot run (float64 in flash attention, a mask where it takes none) is counted as not
applicable. :data:`kvverify.checks.compare.FAST_TOLERANCES` is set from these figures.

``--target MODULE:FACTORY`` measures a lossy cache instead: cases drawn within its declaration (strict numerics,
so every difference is the cache's), generated uncached and with the target's caches; it prints the largest
logit difference per dtype, over the steps where both chose the same tokens, and a ``lossy_atol`` to declare.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvverify.caches import ContiguousCache
from kvverify.checks import (
    Case,
    DeviceError,
    Target,
    TargetError,
    cases,
    compared_difference,
    make_target,
    resolve_device,
    resolve_target,
)
from kvverify.engine.generation import generate
from kvverify.protocol.config import DTYPES
from kvverify.reference.model import Generation
from kvverify.reference.threads import torch_threads

#: The SDPA backends worth measuring on each device type (torch picks among them by shape, dtype and mask).
BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": ("math", "flash"),
    "cuda": ("math", "flash", "efficient", "cudnn"),
}
_SDP_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


@dataclass
class Drift:
    """The worst cached/uncached difference seen for one dtype."""

    max_abs: float = 0.0
    max_logit: float = 0.0
    cases: int = 0
    not_applicable: int = 0


def measure(
    n_cases: int, seed: int, device: torch.device | str = "cpu", backend: str | None = None
) -> dict[str, Drift]:
    """dtype name -> the worst drift over ``n_cases`` drawn cases, with SDPA restricted to ``backend`` (None:
    torch's own choice)."""
    worst: dict[str, Drift] = defaultdict(Drift)
    device = torch.device(device)

    @hypothesis_seed(seed)
    @settings(max_examples=n_cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(dtype=tuple(DTYPES), numerics="fast"))
    def run(case: Case) -> None:
        case = Case(case.config.replace(device=str(device)), case.prompt, case.pad, case.max_new_tokens, case.seed)
        entry = worst[str(case.config.dtype).removeprefix("torch.")]
        try:
            with sdpa_kernel(_SDP_BACKENDS[backend]) if backend else contextlib.nullcontext():
                expected, actual = _both_ways(case)
        except RuntimeError as error:
            if "No available kernel" not in str(error):
                raise
            entry.not_applicable += 1
            return
        steps = int((expected.tokens == actual.tokens).all(0).long().cumprod(0).sum())  # until tokens split
        diff = (expected.logits[:, :steps].double() - actual.logits[:, :steps].double()).abs()
        entry.max_abs = max(entry.max_abs, float(diff.max()) if diff.numel() else 0.0)
        entry.max_logit = max(entry.max_logit, float(expected.logits.double().abs().max()))
        entry.cases += 1

    with torch_threads(1):
        run()
    return dict(worst)


def _both_ways(case: Case) -> tuple[Generation, Generation]:
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    expected = model.generate(prompt, case.max_new_tokens, use_cache=False, attention_mask=mask)
    actual = generate(model, prompt, case.max_new_tokens, cache=ContiguousCache(), attention_mask=mask)
    return expected, actual


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cases", type=int, default=400, help="drawn cases per backend (default: 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--backend", nargs="+", choices=sorted(_SDP_BACKENDS),
                        help="SDPA backends to measure (default: every one that applies on the device)")
    parser.add_argument("--target", metavar="MODULE:FACTORY",
                        help="measure a lossy cache's largest logit difference instead (strict numerics)")
    parser.add_argument("--shapes", choices=("default", "production"), default="default",
                        help="with --target: the shapes drawn (default: default)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, option="--device")
        if args.target:
            target = make_target(resolve_target(args.target), args.target, device=device, shapes=args.shapes)
    except (DeviceError, TargetError) as error:
        parser.exit(2, f"{error}\n")
    if args.target:
        return _report_target(target, args.cases, args.seed)
    for backend in args.backend or BACKENDS.get(device.type, ("math",)):
        for dtype, drift in sorted(measure(args.cases, args.seed, device, backend).items()):
            skipped = f", {drift.not_applicable} not applicable" if drift.not_applicable else ""
            print(f"{device} {backend:>9} {dtype:>9}: max abs difference {drift.max_abs:.3g} over {drift.cases} "
                  f"cases{skipped} (largest |logit| {drift.max_logit:.3g})")
    return 0


def measure_target(target: Target, n_cases: int, seed: int) -> dict[str, Drift]:
    """dtype name -> the largest logit difference between uncached generation and the target's caches over
    ``n_cases`` cases drawn within its declaration, in strict numerics (so the reference side is exact)."""
    worst: dict[str, Drift] = defaultdict(Drift)
    constraints = {**target.config_constraints(), "numerics": "strict"}
    constraints.setdefault("dtypes", tuple(DTYPES))

    @hypothesis_seed(seed)
    @settings(max_examples=n_cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(dtype=tuple(DTYPES), **constraints))
    def run(case: Case) -> None:
        model, prompt, mask = case.model(), case.tokens(), case.attention_mask()
        expected = model.generate(prompt, case.max_new_tokens, use_cache=False, attention_mask=mask)
        actual = generate(model, prompt, case.max_new_tokens, cache=target.new_cache(case.config), attention_mask=mask)
        entry = worst[str(case.config.dtype).removeprefix("torch.")]
        difference = compared_difference(expected.logits, actual.logits, expected.tokens, actual.tokens)
        entry.max_abs = max(entry.max_abs, difference)
        entry.max_logit = max(entry.max_logit, float(expected.logits.double().abs().max()))
        entry.cases += 1

    with torch_threads(1):
        run()
    return dict(worst)


def _report_target(target: Target, n_cases: int, seed: int) -> int:
    worst = measure_target(target, n_cases, seed)
    for dtype, drift in sorted(worst.items()):
        print(f"{target.name} {dtype:>9}: max abs logit difference {drift.max_abs:.3g} over {drift.cases} cases "
              f"(largest |logit| {drift.max_logit:.3g})")
    largest = max((d.max_abs for d in worst.values()), default=0.0)
    declared = target.declaration.lossy_atol
    print(f"largest difference {largest:.3g}; declared lossy_atol {declared!r}; a margin of 2x: "
          f"CacheDeclaration(lossy_atol={2 * largest:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
