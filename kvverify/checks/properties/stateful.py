"""Random sequences of update / crop / reorder / reset / fork against a trivially correct model of the cache.

Two ways in, sharing :class:`~kvverify.checks.properties.session.Session`: the ``stateful`` property draws a whole
:class:`Program` (so the suite's runner runs, shrinks and reports it like any property), and
:func:`machine_for` builds a :class:`hypothesis.stateful.RuleBasedStateMachine` for
``run_state_machine_as_test``. Destructive operations are rarer than appends in both.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from kvverify.checks.boundaries import aimed, at_marks, near_marks
from kvverify.checks.case import Case, build_model
from kvverify.checks.compare import GenerationMismatch
from kvverify.checks.confirm import confirm
from kvverify.checks.properties.session import Session
from kvverify.checks.property import Draw, Property, random_tokens, strict_cases, tensor
from kvverify.checks.target import Target
from kvverify.protocol.cache import resolve_crop
from kvverify.protocol.config import ModelConfig

#: Operation kinds and the optional cache method each needs (None: always available).
KINDS: dict[str, str | None] = {"append": None, "crop": "crop", "reorder": "reorder_cache", "reset": "reset",
                                "fork": None}


@dataclass(frozen=True)
class Operation:
    """tokens: (B, T) for append, or the tokens the original takes after a fork; argument: crop's; beam: reorder's."""

    kind: str
    tokens: tuple[tuple[int, ...], ...] = ()
    argument: int = 0
    beam: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "append":
            return f"append {len(self.tokens[0])} tokens"
        if self.kind == "crop":
            return f"crop({self.argument})"
        if self.kind == "reorder":
            return f"reorder_cache({list(self.beam)})"
        return "fork (deepcopy)" if self.kind == "fork" else "reset()"


@dataclass(frozen=True)
class Program:
    """Prefill ``case``'s prompt, run ``operations``, then append one token to observe the final state."""

    case: Case
    operations: tuple[Operation, ...]
    last: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        return f"{self.case.describe()}\noperations: {'; '.join(str(op) for op in self.operations) or 'none'}"


def _operation(draw: Draw, config: ModelConfig, batch: int, capabilities: frozenset[str], length: int = 0,
               block_size: int | None = None) -> Operation:
    """One operation on a session holding ``length`` tokens; a crop keeps a length next to a boundary
    (:mod:`kvverify.checks.boundaries`) half the time."""
    kinds = [k for k, need in KINDS.items() if need is None or need in capabilities]
    appends = ["append"] * 3 * (len(kinds) - 1)  # destructive operations are rarer than appends
    kind = draw(st.sampled_from(appends + kinds + ["fork"]), label="operation")  # forks twice: both sides write
    if kind in ("append", "fork"):
        count = draw(st.integers(1, 4), label="tokens")
        return Operation(kind, tokens=random_tokens(draw, config, batch, count, "tokens"))
    if kind == "crop":
        return _crop(draw, config, length, block_size)
    if kind == "reorder":
        rows = list(range(batch))
        beam = draw(st.permutations(rows) | st.lists(st.sampled_from(rows), min_size=batch, max_size=batch))
        return Operation(kind, beam=tuple(beam))
    return Operation(kind)


def _crop(draw: Draw, config: ModelConfig, length: int, block_size: int | None) -> Operation:
    """crop(argument): any small argument, or one that keeps a length next to a boundary (as a length to keep,
    or as how many tokens to drop)."""
    keep = aimed(config, 0, length, block_size)
    drop = keep.filter(lambda k: k < length).map(lambda k: k - length) if length else st.nothing()
    return Operation("crop", argument=draw(st.integers(-20, 20) | keep | drop, label="crop argument"))


def _length_after(operation: Operation, length: int, config: ModelConfig) -> int:
    """What a session holds after ``operation`` (:func:`apply`), for a cache that does not refuse the crop."""
    room = config.max_seq_len - length
    if operation.kind == "append" and room >= 1:
        return length + min(len(operation.tokens[0]), room)
    if operation.kind == "fork":
        count = min(len(operation.tokens[0]), room - 1)
        return length + count + 1 if count >= 1 and length else length
    if operation.kind == "crop":
        return resolve_crop(operation.argument, length)
    return 0 if operation.kind == "reset" else length


#: The session recomputes the whole sequence after every append (its oracle), so prompts stop here: past the
#: default shapes' largest buffer (544), short of production's 4,096, where one program of a few appends and a
#: fork took over a minute at d_model 1024. Long contexts are the other properties' and long_context's.
LONGEST_PROMPT = 600


def _shortened(case: Case, longest: int) -> Case:
    """``case`` with its prompt cut to its first ``longest`` tokens (left padding kept inside it)."""
    if case.prompt_len <= longest:
        return case
    rows = tuple(row[:longest] for row in case.prompt)
    return Case(case.config, rows, tuple(min(pad, longest - 1) for pad in case.pad), case.max_new_tokens, case.seed)


@st.composite
def programs(draw: st.DrawFn, target: Target) -> Program:
    # invariant: lengths are simulated as apply() will change them, so that forks, reorders, resets and crops
    # are often preceded by a multi-token append that brings the session next to a boundary
    case = _shortened(draw(strict_cases(target), label="case"), LONGEST_PROMPT)
    config, block = case.config, target.declaration.block_size
    count = draw(st.integers(1, 8), label="operations")
    length, operations = case.prompt_len, []
    for _ in range(count):
        operation = _operation(draw, config, case.batch, target.capabilities, length, block)
        last = config.max_seq_len - 6  # room left for what a fork writes on each side, and appends after
        near = near_marks(config, length + 1, last, block)
        if operation.kind != "append" and near and draw(st.booleans(), label="first append up to a boundary"):
            reach = at_marks(config, length + 1, last, block)
            size = draw(reach, label="length before the operation") - length
            operations.append(Operation("append", tokens=random_tokens(draw, config, case.batch, size, "tokens")))
            length += size
            if operation.kind == "crop":  # aim the crop from the new length
                operation = _crop(draw, config, length, block)
        operations.append(operation)
        length = _length_after(operation, length, config)
    return Program(case, tuple(operations), random_tokens(draw, config, case.batch, 1, "last token"))


def apply(session: Session, operation: Operation) -> bool:
    """Run one operation on the session; False when the cache refused a crop."""
    rows = tensor(operation.tokens, session.tokens) if operation.tokens else None
    if operation.kind == "append" and rows is not None:
        if session.room >= 1:
            session.append(rows[:, : session.room])
    elif operation.kind == "fork" and rows is not None:
        session.fork(rows[:, : session.room])
    elif operation.kind == "crop":
        return session.crop(operation.argument)
    elif operation.kind == "reorder":
        session.reorder(list(operation.beam))
    elif operation.kind == "reset":
        session.reset()
    return True


def check_program(target: Target, program: Program) -> None:
    case = program.case
    session = Session(target, case.model(), case.batch)
    session.append(case.tokens(), case.attention_mask())
    for operation in program.operations:
        apply(session, operation)  # after a refused crop the cache must be as it was: later steps check that
    if session.room >= 1:
        session.append(tensor(program.last, session.tokens))


STATEFUL = Property(
    name="stateful",
    summary=(
        "Random sequences of appends, crop, reorder_cache, reset and fork (deepcopy) agree after every step "
        "with a trivially correct list-of-tensors cache in lengths, returned keys and values and logits: bugs "
        "that need several operations in a row, shared storage between copies, wrong returned shapes or heads."
    ),
    needs=frozenset(),
    strategy=programs,
    check=check_program,
)


def machine_for(target: Target, config: ModelConfig, *, batch: int = 2, seed: int = 0) -> type[RuleBasedStateMachine]:
    """A state machine driving ``target`` with a model of ``config``; run it with
    ``hypothesis.stateful.run_state_machine_as_test(machine_for(...))``. In fast numerics a logit difference
    within rounding's reach is confirmed as the ``stateful`` property confirms it: the operations so far are
    replayed on a new cache with the model in strict numerics, and the difference counts only if that fails too
    (an explained one ends the run's checks: the rest of it does nothing)."""
    model = build_model(config, seed)
    capabilities = target.capabilities

    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.session = Session(target, model, batch)
            self.stopped = False  # after a fast-numerics difference that strict numerics explained
            self.applied: list[Operation] = []

        def run(self, operation: Operation) -> None:
            self.applied.append(operation)
            try:
                apply(self.session, operation)
            except GenerationMismatch as fast:
                operations = tuple(self.applied)
                strict = config.replace(numerics="strict")
                confirm(fast, None if config.numerics != "fast" else lambda: _replay(target, strict, seed, batch,
                                                                                      operations))
                self.stopped = True

        @initialize(data=st.data())
        def prefill(self, data: st.DataObject) -> None:
            length = data.draw(st.integers(1, min(8, config.max_seq_len)), label="prompt length")
            self.run(Operation("append", tokens=random_tokens(data.draw, config, batch, length, "prompt")))

        @precondition(lambda self: self.stopped)
        @rule()
        def explained(self) -> None:
            """Nothing to check after a difference strict numerics explained."""

        @precondition(lambda self: not self.stopped and self.session.room >= 1)
        @rule(data=st.data())
        def decode_one(self, data: st.DataObject) -> None:
            self.run(Operation("append", tokens=random_tokens(data.draw, config, batch, 1, "token")))

        @precondition(lambda self: not self.stopped and self.session.room >= 1)
        @rule(data=st.data())
        def append_chunk(self, data: st.DataObject) -> None:
            count = data.draw(st.integers(2, 4), label="tokens")
            self.run(Operation("append", tokens=random_tokens(data.draw, config, batch, count, "tokens")))

        @precondition(lambda self: not self.stopped)
        @rule(data=st.data())
        def destructive(self, data: st.DataObject) -> None:
            operation = _operation(data.draw, config, batch, capabilities)
            if operation.kind != "append":
                self.run(operation)  # a refused crop leaves the cache as it was

    return CacheMachine


def _replay(target: Target, config: ModelConfig, seed: int, batch: int, operations: tuple[Operation, ...]) -> None:
    """``operations`` (the first one the prompt) on a new cache of ``target``, with a model of ``config``."""
    session = Session(target, build_model(config, seed), batch)
    for operation in operations:
        apply(session, operation)
