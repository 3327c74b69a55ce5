"""Measure how far cached and uncached logits drift apart in fast numerics, per dtype.

``python -m kvverify.commands.measure_tolerance [--cases N] [--seed S]`` draws cases from the property suite's
strategy (every positional scheme, norm, window, GQA shape and left padding) in fast numerics, generates
with and without a contiguous cache, and prints the largest max-abs logit difference and the largest logit
magnitude seen per dtype. :data:`kvverify.suite.compare.FAST_TOLERANCES` is set from these figures.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from kvverify.caches import ContiguousCache
from kvverify.reference.config import DTYPES
from kvverify.reference.threads import torch_threads
from kvverify.suite.case import Case
from kvverify.suite.strategies import cases


def measure(n_cases: int, seed: int) -> dict[str, tuple[float, float, int]]:
    """dtype name -> (max abs difference, max |logit|, cases)."""
    worst: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])

    @hypothesis_seed(seed)
    @settings(max_examples=n_cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(dtype=tuple(DTYPES), numerics="fast"))
    def run(case: Case) -> None:
        model = case.model()
        prompt, mask = case.tokens(), case.attention_mask()
        expected = model.generate(prompt, case.max_new_tokens, use_cache=False, attention_mask=mask)
        actual = model.generate(prompt, case.max_new_tokens, cache=ContiguousCache(), attention_mask=mask)
        steps = int((expected.tokens == actual.tokens).all(0).long().cumprod(0).sum())  # until tokens split
        diff = (expected.logits[:, :steps].double() - actual.logits[:, :steps].double()).abs()
        entry = worst[str(case.config.dtype).removeprefix("torch.")]
        entry[0] = max(entry[0], float(diff.max()) if diff.numel() else 0.0)
        entry[1] = max(entry[1], float(expected.logits.double().abs().max()))
        entry[2] += 1

    with torch_threads(1):
        run()
    return {k: (v[0], v[1], int(v[2])) for k, v in worst.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for dtype, (diff, magnitude, count) in sorted(measure(args.cases, args.seed).items()):
        print(f"{dtype:>9}: max abs difference {diff:.3g} over {count} cases (largest |logit| {magnitude:.3g})")


if __name__ == "__main__":
    main()
