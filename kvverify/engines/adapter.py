"""What an engine adapter is: how kvverify submits a schedule's requests to a serving engine and reads back each
request's tokens, its per-step logits and what the engine did (allocation, sharing, preemption).

An adapter is any object with the :class:`EngineAdapter` attributes and methods; :mod:`kvverify.engines.registry`
names them. The properties (:mod:`kvverify.engines.properties`) and the strategies see engines only through this
interface: what schedules the engine can run (its :class:`~kvverify.engines.schedule.ScheduleSpace`), what each
request must equal and how closely (its :class:`~kvverify.engines.oracle.Oracle`), and how to run a schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from kvverify.engines.oracle import Oracle
    from kvverify.engines.schedule import ModelSpec, Schedule, ScheduleSpace

#: Hard paths of an engine that a run can reach; the table counts the examples that reached each.
COVERAGE = ("preempted", "shared", "chunked", "sliding")


@dataclass
class RequestOutput:
    """One request's result: its generated tokens and, for each, the logits (vocab,) it was chosen from."""

    tokens: list[int]
    logits: list[torch.Tensor | None]


@dataclass
class Step:
    """One forward pass of the engine: ``batch`` holds (request id, past length, query length) per request in it;
    ``events`` what the engine did while scheduling and running it (allocations, shared blocks, preemptions)."""

    index: int
    batch: list[tuple[str, int, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def describe(self) -> str:
        batch = ", ".join(f"{rid} past {past} +{query}" for rid, past, query in self.batch) or "(none)"
        return "\n".join([f"step {self.index}: {batch}", *(f"    {event}" for event in self.events)])


@dataclass
class EngineRun:
    """Everything one engine run gave back. ``reached``: the :data:`COVERAGE` paths it took; ``error``: what the
    engine raised, if it did (the outputs then hold what it finished before). ``largest_difference`` and
    ``near_ties``: filled by the property for an engine compared within a tolerance (the largest |Δ| of any
    logit against the oracle, and the steps where the oracle's top two were a near tie)."""

    outputs: dict[str, RequestOutput]
    steps: list[Step]
    reached: set[str] = field(default_factory=set)
    error: str | None = None
    largest_difference: float | None = None
    near_ties: int = 0

    def around(self, request_id: str, generated: int, context: int = 2) -> str:
        """The steps around the one where ``request_id`` produced its token number ``generated`` (0-based):
        where it went wrong, and what the engine did just before."""
        hits = [i for i, step in enumerate(self.steps) if any(rid == request_id for rid, _, _ in step.batch)]
        producing = [i for i in hits if self._produced(request_id, i) == generated]
        at = producing[-1] if producing else (hits[-1] if hits else len(self.steps) - 1)
        chosen = self.steps[max(0, at - context): at + 1]
        return "\n".join(step.describe() for step in chosen)

    def _produced(self, request_id: str, index: int) -> int | None:
        for event in self.steps[index].events:
            if event.startswith(f"{request_id} chose token #"):
                return int(event.split("#", 1)[1].split(" ", 1)[0])
        return None


class EngineAdapter(Protocol):
    """A serving engine, as the properties drive it."""

    #: The engine's name on the command line (``kvverify verify-engine NAME``).
    name: str
    #: What the strategies draw for it: models, page sizes, knobs, request sizes.
    space: ScheduleSpace
    #: What each request must equal: bit for bit, or within a tolerance with near ties.
    oracle: Oracle
    #: Schedules drawn for ``matches_alone`` per profile (dev, ci, thorough).
    examples: Mapping[str, int]
    #: The properties it is checked for (:data:`kvverify.engines.runner.PROPERTIES`, or some of them).
    properties: tuple[str, ...]
    #: Seconds one example may take by default (``--time-limit``).
    time_limit: float

    def version(self) -> str:
        """The engine's version, for the run's header line; ImportError, saying how to get it, when the engine is
        not installed here."""
        ...

    def description(self) -> str:
        """What of the engine runs, in one line, for the table's header."""
        ...

    def allows_sharing(self, model: ModelSpec) -> bool:
        """Whether the engine shares cache blocks between requests (prefix caching) for this model."""
        ...

    def run(self, schedule: Schedule) -> EngineRun:
        """Run every request of the schedule to completion, greedily (under the batch-invariant kernels, for an
        engine compared bit for bit); each request is named :meth:`Schedule.request_id`. Never raises for the
        engine's own errors: they go into :attr:`EngineRun.error`."""
        ...
