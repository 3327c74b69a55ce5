"""How far cached and uncached logits drift apart where they are compared within a tolerance: fast numerics
per device, SDPA backend and dtype (:func:`measure`), and a lossy cache against uncached strict generation
(:func:`measure_target`). ``kvverify measure-tolerance`` prints both; :data:`kvverify.checks.compare.FAST_TOLERANCES`
and the built-in lossy caches' ``lossy_atol`` are set from these figures.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvverify.caches import ContiguousCache
from kvverify.checks.case import Case
from kvverify.checks.drift import compared_difference
from kvverify.checks.expected import expected_generation
from kvverify.checks.strategies import cases
from kvverify.checks.target import Target
from kvverify.engine.generation import generate
from kvverify.protocol.config import DTYPES
from kvverify.reference.model import Generation
from kvverify.reference.threads import torch_threads

#: The SDPA backends worth measuring on each device type (torch picks among them by shape, dtype and mask).
BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": ("math", "flash"),
    "cuda": ("math", "flash", "efficient", "cudnn"),
}
SDP_BACKENDS = {
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
    differences: list[float] = field(default_factory=list)  # every case's max-abs difference

    def quantile(self, q: float) -> float:
        """The max-abs difference that a fraction ``q`` of the cases stay at or under (nearest rank)."""
        ranked = sorted(self.differences)
        return ranked[min(len(ranked) - 1, int(q * len(ranked)))] if ranked else 0.0


def measure(
    n_cases: int, seed: int, device: torch.device | str = "cpu", backend: str | None = None,
    dtypes: tuple[str, ...] = tuple(DTYPES),
) -> dict[str, Drift]:
    """dtype name -> the worst drift over ``n_cases`` drawn cases (of ``dtypes``), with SDPA restricted to
    ``backend`` (None: torch's own choice)."""
    worst: dict[str, Drift] = defaultdict(Drift)
    device = torch.device(device)

    @hypothesis_seed(seed)
    @settings(max_examples=n_cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(dtype=dtypes, numerics="fast"))
    def run(case: Case) -> None:
        case = Case(case.config.replace(device=str(device)), case.prompt, case.pad, case.max_new_tokens, case.seed)
        entry = worst[str(case.config.dtype).removeprefix("torch.")]
        try:
            with sdpa_kernel(SDP_BACKENDS[backend]) if backend else contextlib.nullcontext():
                expected, actual = _both_ways(case)
        except RuntimeError as error:
            if "No available kernel" not in str(error):
                raise
            entry.not_applicable += 1
            return
        steps = int((expected.tokens == actual.tokens).all(0).long().cumprod(0).sum())  # until tokens split
        diff = (expected.logits[:, :steps].double() - actual.logits[:, :steps].double()).abs()
        entry.differences.append(float(diff.max()) if diff.numel() else 0.0)
        entry.max_abs = max(entry.max_abs, entry.differences[-1])
        entry.max_logit = max(entry.max_logit, float(expected.logits.double().abs().max()))
        entry.cases += 1

    with torch_threads(1):
        run()
    return dict(worst)


def _both_ways(case: Case) -> tuple[Generation, Generation]:
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    actual = generate(model, prompt, case.max_new_tokens, cache=ContiguousCache(), attention_mask=mask)
    return expected_generation(model, prompt, case.max_new_tokens, mask, actual), actual  # as the suite compares


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
