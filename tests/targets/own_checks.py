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


#: Every call of :func:`build_once`, in order, beside the checks it came before.
CALLS: list[str] = []


def build_once() -> None:
    CALLS.append("prepare")


def checks_after_build(*, profile: str, seed: int, device: torch.device, max_examples: int | None) -> SuiteResult:
    CALLS.append("checks")
    return SuiteResult(target="own", seed=seed, profile=profile, results=[PropertyResult("holds", "passed", 3, 0.1)])


def build_fails() -> None:
    raise RuntimeError("ninja: build stopped: subcommand failed")
