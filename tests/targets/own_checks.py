"""A library's own checks, as ``LibraryCache.checks`` names them: one that holds and one that fails."""

from __future__ import annotations

import torch

from kvverify.runs.runner import PropertyResult, SuiteResult


def two_checks(*, profile: str, seed: int, device: torch.device, max_examples: int | None) -> SuiteResult:
    return SuiteResult(target="own", seed=seed, profile=profile, results=[
        PropertyResult("holds", "passed", 3, 0.1),
        PropertyResult("breaks", "failed", 2, 0.2, detail="it broke at step 1\nminimal case: ..."),
    ])


def refuses(*, profile: str, seed: int, device: torch.device, max_examples: int | None) -> SuiteResult:
    raise ValueError("these checks run on the CPU only")
