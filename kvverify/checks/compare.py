"""Comparing two generations: bit for bit, or within a stated tolerance with identical greedy tokens.

A mismatch is reported as the first diverging step and batch row, with the max absolute and relative
error, the distance in ULPs and the tokens on both sides, never as a bare ``AssertionError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvverify.reference.model import Generation

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Tolerance:
    """Logits may differ by ``atol + rtol * |expected|``; greedy tokens must agree except right after a
    near tie, a step where the expected top-two logits are closer than twice the allowed error: from there on
    the two generations may legitimately continue differently, so the comparison stops there for that row
    (unless both were fed the same tokens: see :func:`compare_generations`)."""

    atol: float
    rtol: float = 0.0
    why: str = ""
    near_ties: bool = True  # False: greedy tokens must agree at every step (transformers' own tests' rule)


#: Fast numerics (standard kernels), cached vs uncached logits on the reference model. Measured with
#: ``kvverify measure-tolerance --cases 500 --seed S`` for S in 0..3 (about 2,000 cases drawn by the
#: property suite's strategy: every positional scheme, norm, window, GQA shape, left padding; logits up to
#: |5|): the largest max-abs difference seen per dtype, times about 4. Strict numerics needs none of this.
FAST_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=5e-14, why="float64: largest difference seen 1.2e-14"),
    torch.float32: Tolerance(atol=2e-5, why="float32: largest difference seen 4.1e-6"),
    torch.bfloat16: Tolerance(atol=0.25, why="bfloat16: largest difference seen 0.055 (2 ULPs at |logit| 4)"),
    torch.float16: Tolerance(atol=0.05, why="float16: largest difference seen 0.011"),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return FAST_TOLERANCES[dtype]


@dataclass(frozen=True)
class Mismatch:
    """The first place two generations disagree."""

    step: int
    row: int
    max_abs: float
    max_rel: float
    ulps: int
    expected_tokens: list[int]
    actual_tokens: list[int]
    reason: str
    tolerance: Tolerance | None = None  # what the comparison allowed (None: bit for bit)

    def __str__(self) -> str:
        return (
            f"{self.reason} at step {self.step}, batch row {self.row}: "
            f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, {self.ulps} ULPs\n"
            f"  expected tokens: {self.expected_tokens}\n"
            f"  actual tokens:   {self.actual_tokens}"
        )


class GenerationMismatch(AssertionError):
    """Cached and uncached generations differ; ``mismatch`` says where and by how much."""

    def __init__(self, mismatch: Mismatch, context: str = "", note: str = "") -> None:
        self.mismatch, self.context = mismatch, context
        super().__init__(f"{context}{mismatch}" + (f"\n{note}" if note else ""))

    def noted(self, note: str) -> GenerationMismatch:
        """The same mismatch, its message followed by ``note`` (a line of its own)."""
        return GenerationMismatch(self.mismatch, self.context, note)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest number of representable values between corresponding elements of two float tensors."""
    if a.numel() == 0:
        return 0
    int_type = _INT_OF_WIDTH[a.element_size()]
    lowest = torch.iinfo(int_type).min

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(int_type).to(torch.int64)
        return torch.where(bits < 0, lowest - bits, bits)

    both_nan = torch.isnan(a) & torch.isnan(b)
    distance = (ordered(a) - ordered(b)).abs().masked_fill(both_nan, 0)
    return int(distance.max())


def _errors(expected: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    e, a = expected.double(), actual.double()
    diff = (e - a).abs().nan_to_num(nan=float("inf"))
    return float(diff.max()), float((diff / e.abs().clamp_min(1e-30)).max())


def _mismatch(
    expected: Generation, actual: Generation, step: int, row: int, reason: str, tolerance: Tolerance | None
) -> Mismatch:
    e, a = expected.logits[row, step], actual.logits[row, step]
    max_abs, max_rel = _errors(e, a)
    return Mismatch(
        step=step,
        row=row,
        max_abs=max_abs,
        max_rel=max_rel,
        ulps=ulp_distance(e, a),
        expected_tokens=expected.tokens[row, : step + 1].tolist(),
        actual_tokens=actual.tokens[row, : step + 1].tolist(),
        reason=reason,
        tolerance=tolerance,
    )


def _check_shapes(expected: Generation, actual: Generation) -> None:
    if expected.logits.shape != actual.logits.shape:
        raise ValueError(f"generations differ in shape: {tuple(expected.logits.shape)} vs {tuple(actual.logits.shape)}")


@dataclass(frozen=True)
class Agreement:
    """Two generations compared: ``mismatch`` is the first difference outside the tolerance (None: they agree);
    ``near_ties`` the (row, step) where greedy tokens differ at a near tie, in step order; ``max_abs`` the
    largest logit difference over every step and row."""

    mismatch: Mismatch | None
    near_ties: tuple[tuple[int, int], ...]
    max_abs: float


def first_difference(expected: Generation, actual: Generation, tolerance: Tolerance | None = None) -> Mismatch | None:
    """None when the generations agree: bitwise with no tolerance, else within it with identical tokens."""
    return _walk(expected, actual, tolerance, teacher_forced=False)[0]


def compare_generations(
    expected: Generation, actual: Generation, tolerance: Tolerance | None = None, *, teacher_forced: bool = False
) -> Agreement:
    """:func:`first_difference`, with the near ties met on the way and the largest logit difference.

    ``teacher_forced``: ``actual`` was fed ``expected``'s tokens (its own greedy choices only read off its
    logits), so a near tie splits nothing and every step of every row is compared.
    """
    mismatch, near_ties = _walk(expected, actual, tolerance, teacher_forced)
    max_abs = _errors(expected.logits, actual.logits)[0] if expected.logits.numel() else 0.0
    return Agreement(mismatch, near_ties, max_abs)


def _walk(
    expected: Generation, actual: Generation, tolerance: Tolerance | None, teacher_forced: bool
) -> tuple[Mismatch | None, tuple[tuple[int, int], ...]]:
    _check_shapes(expected, actual)
    steps, rows = expected.logits.shape[1], expected.logits.shape[0]
    alive = torch.ones(rows, dtype=torch.bool, device=expected.logits.device)  # rows not yet split by a near tie
    near_ties: list[tuple[int, int]] = []
    for step in range(steps):
        e, a = expected.logits[:, step], actual.logits[:, step]  # (B, vocab)
        if tolerance is None:
            same = (e == a) | (torch.isnan(e) & torch.isnan(a))
            bad_rows = ~same.all(-1) & alive
            reason = "logits differ (bitwise comparison)"
        else:
            allowed = tolerance.atol + tolerance.rtol * e.abs()
            bad_rows = ~((e - a).abs() <= allowed).all(-1) & alive
            reason = f"logits differ beyond atol={tolerance.atol:g}, rtol={tolerance.rtol:g}"
        if bool(bad_rows.any()):
            return _mismatch(expected, actual, step, int(bad_rows.nonzero()[0]), reason, tolerance), tuple(near_ties)
        for row in ((expected.tokens[:, step] != actual.tokens[:, step]) & alive).nonzero().flatten().tolist():
            if tolerance is None or not tolerance.near_ties or not _near_tie(e[row], tolerance):
                return _mismatch(expected, actual, step, row, "greedy tokens differ", tolerance), tuple(near_ties)
            near_ties.append((row, step))
            if not teacher_forced:
                alive[row] = False  # both choices are within the tolerance of the best: the paths may split here
    return None, tuple(near_ties)


def _near_tie(logits: torch.Tensor, tolerance: Tolerance) -> bool:
    top2 = logits.double().topk(2).values
    gap = float(top2[0] - top2[1])
    return gap <= 2 * (tolerance.atol + tolerance.rtol * float(top2[0].abs()))


def assert_same_generation(
    expected: Generation, actual: Generation, tolerance: Tolerance | None = None, context: str = ""
) -> None:
    """Raise :class:`GenerationMismatch` at the first difference (see :func:`first_difference`)."""
    mismatch = first_difference(expected, actual, tolerance)
    if mismatch is not None:
        raise GenerationMismatch(mismatch, context)
