"""llama.cpp's checks as ``verify-libs`` runs them: one Hypothesis search per check, each a :class:`PropertyResult`.

``export_matches_reference`` checks the GGUF export first (a fresh llama.cpp evaluation against the reference
model's uncached logits, within :data:`EXPORT_ATOL`); the others run drawn programs
(:mod:`~kvverify.adapters.llamacpp.programs`) of growing sets of operations, each step checked against a fresh
evaluation within :data:`ATOL` (:mod:`~kvverify.adapters.llamacpp.interpreter`). A failure is shrunk by Hypothesis
and reported as its minimal program.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from kvverify.adapters.llamacpp import session
from kvverify.adapters.llamacpp.interpreter import Interpreter
from kvverify.adapters.llamacpp.model import ExportedModel, export
from kvverify.adapters.llamacpp.noise import reference_logits
from kvverify.adapters.llamacpp.oracle import FreshEval, largest_difference
from kvverify.adapters.llamacpp.programs import Operation, programs
from kvverify.runs.runner import PropertyResult, SuiteResult
from kvverify.runs.settings import profile_settings

#: Logit tolerance of a program's step against a fresh evaluation. The noise floor (python -m
#: kvverify.adapters.llamacpp.noise --sequences 40, seed 0 up to 128 tokens, seed 1 up to 250): a fresh evaluation
#: repeated, or in a new context, is bitwise equal (0); other batch sizes (n_batch 1, 3, 16) and incremental
#: evaluation move logits by at most 1.8e-6. 1e-4 is 55 times that, and four orders below a logit's spread (about 1).
ATOL = 1e-4
#: Tolerance of a fresh llama.cpp evaluation against the reference model computed in float64 from the same float32
#: weights: measured at most 1.7e-6 (the float32 reference: 1.8e-6), the float32 arithmetic of 2 layers.
EXPORT_ATOL = 1e-4

#: Each program check: the operation kinds it draws (see kvverify.adapters.llamacpp.programs.KINDS).
PROGRAM_CHECKS: dict[str, tuple[str, ...]] = {
    "incremental_eval": ("eval",),
    "crop": ("eval", "crop"),
    "state_save_load": ("eval", "crop", "state"),
    "generate_prefix_reuse": ("eval", "crop", "state", "generate"),
    "ram_cache_prefix_reuse": ("eval", "crop", "generate", "complete"),
}
CHECKS = ("export_matches_reference", *PROGRAM_CHECKS)


@dataclass
class _Search:
    """What one search saw: examples run up to the first failure, the largest difference, the last (after
    shrinking: minimal) failure."""

    examples: int = 0
    largest: float = 0.0
    failure: str | None = None

    def record(self, largest: float, failure: str | None, case: str) -> None:
        if self.failure is None:  # examples up to the first failure, as PropertyResult counts them (not shrinking)
            self.examples += 1
        self.largest = max(self.largest, largest)
        if failure is not None:
            self.failure = f"{failure}\nminimal case: {case}"
            raise AssertionError(failure)


def _export_test(exported: ExportedModel, search: _Search) -> Callable[..., None]:
    fresh, ref64 = FreshEval(exported.spec), exported.reference64()
    vocab = exported.reference.config.vocab_size

    @given(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=128))
    def test(tokens: list[int]) -> None:
        diff = largest_difference(fresh.logits(tokens), reference_logits(ref64, tokens))
        failure = None if diff <= EXPORT_ATOL else (
            f"a fresh llama.cpp evaluation differs from the reference model's uncached logits by {diff:.3g} "
            f"(tolerance {EXPORT_ATOL:g}): the GGUF export is wrong")
        search.record(diff, failure, f"tokens={tokens}")

    return test


def _program_test(exported: ExportedModel, kinds: tuple[str, ...], search: _Search,
                  avoid_known: bool) -> Callable[..., None]:
    oracle = FreshEval(exported.spec)

    @given(programs(kinds))
    def test(program: list[Operation]) -> None:
        interpreter = Interpreter(exported.spec, oracle, ATOL, avoid_known=avoid_known)
        try:
            outcome = interpreter.run(program)
        finally:
            interpreter.close()
        search.record(outcome.largest, outcome.failure, f"program={program}")

    return test


def _run_one(name: str, test: Callable[..., None], search: _Search, chosen: settings,
             seed_value: int) -> PropertyResult:
    started = time.perf_counter()
    try:
        seed(seed_value)(settings(chosen)(test))()
    except AssertionError:
        pass
    except Exception as error:  # the library raised: a failure of the check, reported as an error
        return PropertyResult(name, "error", search.examples, time.perf_counter() - started,
                              detail=f"{type(error).__name__}: {error}\n{search.failure or ''}".strip())
    seconds = time.perf_counter() - started
    if search.failure is not None:
        return PropertyResult(name, "failed", search.examples, seconds, detail=search.failure,
                              largest_difference=search.largest)
    return PropertyResult(name, "passed", search.examples, seconds,
                          detail=f"largest logit difference {search.largest:.3g}", largest_difference=search.largest)


def run_checks(*, profile: str = "dev", seed: int = 0, device: torch.device | str = "cpu",
               max_examples: int | None = None, checks: tuple[str, ...] = CHECKS,
               avoid_known: bool = False) -> SuiteResult:
    """Every llama.cpp check (or those named), as ``verify-libs`` runs a library's own checks.

    avoid_known: draw around the known stale-logits failure (a generation of exactly the held tokens right after a
    crop is skipped), so the search looks past it."""
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown llama.cpp checks {sorted(unknown)}; expected some of {list(CHECKS)}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"llama-cpp-python's checks run on the CPU build (the wheel tox -e lib-llamacpp builds); "
                         f"got device {device}: run with --device cpu")
    results: list[PropertyResult] = []
    with tempfile.TemporaryDirectory(prefix="kvverify-llamacpp-") as directory:
        exported = export(directory)
        for name in checks:
            search = _Search()
            if name == "export_matches_reference":
                test = _export_test(exported, search)
            else:
                test = _program_test(exported, PROGRAM_CHECKS[name], search, avoid_known)
            results.append(_run_one(name, test, search, profile_settings(profile, max_examples=max_examples), seed))
    return SuiteResult(target=f"llama-cpp-python {session.version()}", seed=seed, profile=profile, results=results)
