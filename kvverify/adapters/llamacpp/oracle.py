"""The oracle of the llama.cpp checks: a fresh evaluation of the same tokens, in a context of its own.

Every check compares what a context shows after some operations (its ``scores`` rows, the tokens it says it holds,
the tokens it chose) with :meth:`FreshEval.logits` of the tokens it should hold: a second context, its memory
cleared (``llama_memory_clear``) before one ``eval`` of the whole sequence. Results are kept by sequence, so a
program re-checking a sequence costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvverify.adapters.llamacpp import session
from kvverify.adapters.llamacpp.session import ContextSpec


class FreshEval:
    """Fresh logits of token sequences: ``logits(tokens)`` is (len(tokens), vocab) float32."""

    def __init__(self, spec: ContextSpec) -> None:
        self.spec = spec
        self._llama: Any = None
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def forget(self) -> None:
        """Drop the kept results: the next ``logits`` evaluates again."""
        self._memo.clear()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        key = tuple(int(t) for t in tokens)
        if not key:
            return np.zeros((0, 0), dtype=np.float32)
        if key not in self._memo:
            if self._llama is None:
                self._llama = session.open_context(self.spec)
            session.clear(self._llama)
            session.evaluate(self._llama, key)
            self._memo[key] = session.logits(self._llama, 0, len(key))  # (T, vocab)
        return self._memo[key]


def largest_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over two (T, vocab) arrays of the same shape (0 for none); inf where either is not finite."""
    if got.size == 0:
        return 0.0
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(np.nan_to_num(diff, nan=np.inf).max())


def greedy_ambiguous(row: np.ndarray, atol: float) -> bool:
    """True when the top two logits of ``row`` (vocab,) are within ``2 * atol``: within the tolerance, either could
    be the greedy choice."""
    top2 = np.sort(row.astype(np.float64))[-2:]
    return bool(top2[1] - top2[0] <= 2 * atol)
