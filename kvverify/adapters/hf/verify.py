"""transformers' own models, cached against uncached, for each of its cache classes: what ``kvverify verify-hf``
runs and prints.

Each model of :data:`~kvverify.adapters.hf.models.MODELS` runs greedy recomputation on a batch of two prompts,
one left-padded (:func:`~kvverify.adapters.hf.generation.uncached_greedy`). Each cache of
:data:`~kvverify.adapters.hf.caches.CACHES` then prefills the same prompt and is fed the uncached run's tokens
one at a time (:func:`~kvverify.adapters.hf.generation.teacher_forced`), and the two are compared by
:func:`kvverify.checks.compare.compare_generations`: every step's logits within the tolerance, and every greedy
token the same except at a near tie of the uncached run.

Tolerance. transformers computes with the standard kernels, whose results depend on how many rows are
computed at once, so an exact cache still differs from recomputation by float noise: at most 1.2e-5 over
seeds 0-7 of llama, qwen2 and gpt2 (``kvverify verify-hf --seed N``, "max |Δ|" column), for logits of
magnitude up to about 8. ``EXACT_ATOL = 1e-4`` leaves a margin of 8x and is far below what a dropped
token does (above 0.1). A lossy cache has the tolerance of its registry entry.

``bitwise`` removes the noise instead: with eager attention and
:func:`kvverify.invariant.batch_invariant` (fixed-order kernels for every reduction), every exact cache must
match recomputation bit for bit, on all five models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvverify.adapters.hf.caches import CACHES, NotApplicable
from kvverify.adapters.hf.generation import teacher_forced, uncached_greedy
from kvverify.adapters.hf.models import build_model
from kvverify.checks.compare import Agreement, Tolerance, compare_generations
from kvverify.invariant import batch_invariant
from kvverify.reference.model import Generation

EXACT_ATOL = 1e-4
BATCH, PROMPT_LEN, NEW_TOKENS = 2, 6, 12


def cache_atol(name: str, bitwise: bool = False) -> float:
    """The logit tolerance of a cache: its registry entry's for a lossy one, else EXACT_ATOL (0 when bitwise)."""
    atol = CACHES[name].atol
    if atol is not None:
        return atol
    return 0.0 if bitwise else EXACT_ATOL


def make_prompt(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) and attention_mask (B, T): row 1 left-padded by 2."""
    tokens = torch.randint(0, vocab_size, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    return tokens, mask


@dataclass(frozen=True)
class Comparison:
    """A teacher-forced cached run against the uncached one, within ``atol``.

    tokens: "identical", "near tie at step S" (the first, by row), or "differ: row R step S" (the first token
    difference, by row, that no near tie explains).
    """

    atol: float
    agreement: Agreement
    tokens: str

    @property
    def passed(self) -> bool:
        return self.agreement.mismatch is None

    @property
    def max_error(self) -> float:
        """The largest |cached - uncached| logit over all steps and rows."""
        return self.agreement.max_abs


def compare(expected: Generation, actual: Generation, atol: float) -> Comparison:
    """Compare a teacher-forced run (``actual``) with the uncached one by the suite's rule."""
    agreement = compare_generations(expected, actual, Tolerance(atol=atol), teacher_forced=True)
    return Comparison(atol, agreement, _tokens(expected, actual, agreement))


def _tokens(expected: Generation, actual: Generation, agreement: Agreement) -> str:
    differ = [(row, step) for row, step in (actual.tokens != expected.tokens).nonzero().tolist()]  # by row
    if not differ:
        return "identical"
    unexplained = [where for where in differ if where not in agreement.near_ties]
    if not unexplained:
        return f"near tie at step {min(agreement.near_ties)[1]}"
    row, step = unexplained[0]
    return f"differ: row {row} step {step}"


@dataclass(frozen=True)
class Row:
    """One (model, cache) pair: its comparison, or None and the reason when the cache does not apply (or, with
    ``error``, when generating through the cache raised)."""

    model: str
    cache: str
    comparison: Comparison | None
    reason: str = ""
    error: bool = False

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAIL"
        if self.comparison is None:
            return "n/a"
        return "pass" if self.comparison.passed else "FAIL"


def verify_model(
    name: str, cache_names: list[str], seed: int = 0, bitwise: bool = False, device: str | torch.device = "cpu"
) -> list[Row]:
    """Compare every named cache with recomputation on one model (weights and prompt drawn from ``seed``, then
    moved to ``device``); ``bitwise``: eager attention under :func:`batch_invariant` (the CPU only), exact
    caches compared with tolerance 0."""
    device = torch.device(device)
    if bitwise:
        if device.type != "cpu":
            raise ValueError(f"bitwise comparison swaps the CPU's kernels, so it runs on the CPU only; got {device}")
        with batch_invariant():
            return _verify_model(name, cache_names, seed, bitwise, device)
    return _verify_model(name, cache_names, seed, bitwise, device)


def _verify_model(name: str, cache_names: list[str], seed: int, bitwise: bool, device: torch.device) -> list[Row]:
    model = build_model(name, seed, "eager" if bitwise else None).to(device)
    prompt, mask = (t.to(device) for t in make_prompt(model.config.get_text_config().vocab_size, seed))
    expected = uncached_greedy(model, prompt, mask, NEW_TOKENS)
    rows = []
    for cache_name in cache_names:
        try:
            cache = CACHES[cache_name].for_model(model.config, PROMPT_LEN + NEW_TOKENS)
        except NotApplicable as why:
            rows.append(Row(name, cache_name, None, str(why)))
            continue
        try:
            actual = teacher_forced(model, prompt, mask, expected.tokens, cache)
        except Exception as error:  # the cache (or transformers with it) broke: a finding for this pair only
            rows.append(Row(name, cache_name, None, f"raised {type(error).__name__}: {error}", error=True))
            continue
        rows.append(Row(name, cache_name, compare(expected, actual, cache_atol(cache_name, bitwise))))
    return rows
