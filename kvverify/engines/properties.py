"""The two engine properties, each a check that raises :class:`EngineMismatch` with a report.

1. ``matches_alone``: every request's tokens and per-step logits equal that request generated alone, with no
   cache (the engine's :mod:`oracle <kvverify.engines.oracle>`): bit for bit, or, for an engine whose kernels
   kvverify cannot reach, every logit within the oracle's tolerance, every token the oracle's argmax but at a
   near tie (``verify-hf``'s rule, teacher-forced) and the argmax of the engine's own logits.
2. ``independent_of_neighbours``: one request run in two different schedules (other neighbours, other knobs,
   same model) gives the same tokens and logits, bit for bit.

A report names the request, the token where it first differs, and what the engine did in the steps before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from kvverify.checks.compare import Tolerance, compare_generations
from kvverify.reference.model import Generation

if TYPE_CHECKING:
    from kvverify.engines.adapter import EngineAdapter, EngineRun, RequestOutput
    from kvverify.engines.oracle import Alone
    from kvverify.engines.schedule import Schedule


class EngineMismatch(AssertionError):
    """A request's output differs from what it must be; the message is the whole report."""


@dataclass(frozen=True)
class NeighbourCase:
    """Request ``first_index`` of ``first`` and request ``second_index`` of ``second`` are the same request."""

    first: Schedule
    second: Schedule
    first_index: int
    second_index: int

    def describe(self) -> str:
        return (f"first schedule (the request is {self.first.request_id(self.first_index)}):\n{self.first.describe()}"
                f"\nsecond schedule (the request is {self.second.request_id(self.second_index)}):\n"
                f"{self.second.describe()}")


def check_matches_alone(engine: EngineAdapter, schedule: Schedule) -> EngineRun:
    """Property 1; returns the run (its ``reached`` says which hard paths it took; for an engine compared within a
    tolerance, its ``largest_difference`` and ``near_ties`` are filled in)."""
    run = _run(engine, schedule)
    oracle = engine.oracle
    largest, near_ties = 0.0, 0
    for index, request in enumerate(schedule.requests):
        rid = schedule.request_id(index)
        got = run.outputs.get(rid)
        tokens = got.tokens[: request.max_new_tokens] if got is not None else []
        expected = oracle.expected(schedule.model, request.prompt, tokens, request.max_new_tokens)
        what = f"{rid} generated alone with no cache"
        if oracle.atol is None:
            _compare(run, rid, expected.tokens, expected.logits, what)
        else:
            difference, ties = _compare_within(run, rid, expected, oracle.atol, request.max_new_tokens, what)
            largest, near_ties = max(largest, difference), near_ties + ties
    return run if oracle.atol is None else replace(run, largest_difference=largest, near_ties=near_ties)


def check_independent_of_neighbours(engine: EngineAdapter, case: NeighbourCase) -> None:
    """Property 2."""
    a, b = case.first.requests[case.first_index], case.second.requests[case.second_index]
    if (a.prompt, a.max_new_tokens) != (b.prompt, b.max_new_tokens):
        raise ValueError("NeighbourCase: the two indices must name the same request (prompt and max_new_tokens)")
    first, second = _run(engine, case.first), _run(engine, case.second)
    rid, other = case.first.request_id(case.first_index), case.second.request_id(case.second_index)
    got = first.outputs.get(rid)
    if got is None:
        raise EngineMismatch(f"{rid} of the first schedule never finished; the engine's last steps:\n"
                             f"{_last_steps(first)}")
    reference = second.outputs.get(other)
    if reference is None:
        raise EngineMismatch(f"{other} of the second schedule never finished; the engine's last steps:\n"
                             f"{_last_steps(second)}")
    logits = [row if row is not None else torch.full((1,), float("nan")) for row in reference.logits]
    _compare(first, rid, reference.tokens, logits, f"the same request as {other} of the second schedule")


def _run(engine: EngineAdapter, schedule: Schedule) -> EngineRun:
    run = engine.run(schedule)
    if run.error is not None:
        raise EngineMismatch(f"the engine raised {run.error}\nits last steps:\n{_last_steps(run)}")
    return run


def _compare(run: EngineRun, rid: str, tokens: list[int], logits: list[torch.Tensor], what: str) -> None:
    got = run.outputs.get(rid)
    if got is None:
        raise EngineMismatch(f"{rid} never finished; the engine's last steps:\n{_last_steps(run)}")
    for t, (token, row) in enumerate(zip(tokens, logits, strict=True)):
        if t >= len(got.tokens):
            raise EngineMismatch(f"{rid} stopped after {len(got.tokens)} tokens; expected {len(tokens)} as {what}\n"
                                 f"what the engine did around it:\n{run.around(rid, t)}")
        mine = got.logits[t]
        if mine is None:
            raise EngineMismatch(f"{rid}, token #{t}: the engine chose {got.tokens[t]} but no logits were seen "
                                 f"for it\nwhat the engine did around it:\n{run.around(rid, t)}")
        if got.tokens[t] != token or not torch.equal(mine, row):
            agreed = f"tokens #0..#{t - 1} agreed" if t else "its first token"
            if torch.equal(mine, row):
                what_differs = f"from the same logits as {what}, which give {token} ({agreed})"
            else:
                difference = (mine - row).abs().max().item() if mine.shape == row.shape else float("nan")
                what_differs = (f"from logits that differ from {what} by max |Δ| {difference:.3g} (expected token "
                                f"{token}; {agreed})")
            raise EngineMismatch(f"{rid}, token #{t}: the engine chose {got.tokens[t]} {what_differs}\n"
                                 f"what the engine did around it:\n{run.around(rid, t)}")
    if len(got.tokens) != len(tokens):
        raise EngineMismatch(f"{rid} generated {len(got.tokens)} tokens; expected {len(tokens)} as {what}")


def _compare_within(run: EngineRun, rid: str, expected: Alone, atol: float, new_tokens: int,
                    what: str) -> tuple[float, int]:
    """The request's logits within ``atol`` of ``expected`` (teacher-forced on the engine's tokens), its tokens
    the expected argmax but at a near tie and the argmax of its own logits; returns the largest difference and the
    near ties met."""
    got = _output(run, rid)
    count = min(len(got.tokens), new_tokens)
    if count == 0:
        raise EngineMismatch(f"{rid} generated no token; expected {new_tokens} as {what}\n"
                             f"the engine's last steps:\n{_last_steps(run)}")
    for t in range(count):
        mine = got.logits[t]
        if mine is None:
            raise EngineMismatch(f"{rid}, token #{t}: the engine chose {got.tokens[t]} but no logits were seen "
                                 f"for it\nwhat the engine did around it:\n{run.around(rid, t)}")
        token, around = got.tokens[t], f"what the engine did around it:\n{run.around(rid, t)}"
        if mine.shape != expected.logits[t].shape:
            raise EngineMismatch(f"{rid}, token #{t}: the engine returned logits of shape {tuple(mine.shape)}; "
                                 f"expected {tuple(expected.logits[t].shape)}\n{around}")
        if not 0 <= token < mine.numel() or mine[token] < mine.max():
            raise EngineMismatch(f"{rid}, token #{t}: the engine chose {token}, which is not the argmax of its own "
                                 f"logits ({int(mine.argmax())})\n{around}")
    engine_side = _generation(got.tokens[:count], [row for row in got.logits[:count] if row is not None])
    agreement = compare_generations(_generation(expected.tokens, expected.logits), engine_side,
                                    Tolerance(atol=atol, why="the engine's kernels against the oracle"),
                                    teacher_forced=True)
    if agreement.mismatch is not None:
        m = agreement.mismatch
        raise EngineMismatch(
            f"{rid}, token #{m.step}: {m.reason} between the engine and {what} (teacher-forced on the engine's "
            f"tokens): max |Δ| {m.max_abs:.3g}, {m.ulps} ULPs\n  the engine's tokens: {m.actual_tokens}\n"
            f"  the oracle's argmax: {m.expected_tokens}\nwhat the engine did around it:\n{run.around(rid, m.step)}")
    if len(got.tokens) != new_tokens:
        raise EngineMismatch(f"{rid} generated {len(got.tokens)} tokens; expected {new_tokens} as {what}\n"
                             f"what the engine did around it:\n{run.around(rid, count - 1)}")
    return agreement.max_abs, len(agreement.near_ties)


def _output(run: EngineRun, rid: str) -> RequestOutput:
    got = run.outputs.get(rid)
    if got is None:
        raise EngineMismatch(f"{rid} never finished; the engine's last steps:\n{_last_steps(run)}")
    return got


def _generation(tokens: list[int], logits: list[torch.Tensor]) -> Generation:
    """A one-row :class:`Generation` of N tokens and their (vocab,) logits, for the suite's comparison."""
    ids = torch.tensor(tokens)  # (N,)
    return Generation(tokens=ids[None], logits=torch.stack(logits)[None], sequences=ids[None],
                      attention_mask=torch.ones_like(ids)[None], cache=None)


def _last_steps(run: EngineRun, count: int = 3) -> str:
    return "\n".join(step.describe() for step in run.steps[-count:]) or "(no step ran)"
