"""A cache declared ``CacheDeclaration(compile=True)`` works inside ``torch.compile`` and CUDA graphs.

The decode step (:class:`kvverify.engine.compiled.PositionStep`, the cache's ``update`` inlined in it) is compiled
with ``fullgraph=True`` (``fullgraph=False`` where the cache breaks the graph, which the report then says) and
``dynamic=False``, so that a shape or a Python value that changes between steps is a recompile, counted by the
backend (:class:`~kvverify.engine.compiled.CompileCounter`). After a warm-up of two decode steps (the first
compiles; the second may compile once more for state the first allocated), at most one more compilation is
allowed over the rest of the generation, and the compiled generation must equal the eager one within the fast
tolerance. On CUDA the step is also captured in a CUDA graph and replayed
(:class:`~kvverify.engine.graphs.GraphedStep`), which must equal eager too: a cache that reallocates a buffer
leaves a captured graph on the old one.

The backend is ``KVVERIFY_COMPILE_BACKEND`` (default ``"eager"``: dynamo's tracing, guards and recompiles
without C++ compilation, seconds per example on a CPU); ``"aot_eager"`` adds functionalisation, ``"inductor"``
the real kernels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from hypothesis import strategies as st

from kvverify.checks.case import Case
from kvverify.checks.property import Property, expect_same
from kvverify.checks.strategies import cases
from kvverify.checks.target import Target
from kvverify.engine.generation import generate
from kvverify.protocol.cache import KVCache
from kvverify.reference.model import Generation, ReferenceModel

#: Decode steps before the compilations are counted: the first compiles, the second may compile once more.
WARMUP_STEPS = 2
#: Compilations allowed after the warm-up, over the whole generation.
RECOMPILES_ALLOWED = 1
#: The fewest new tokens a case decodes (prefill's token, the warm-up, then steps to count recompiles over: a
#: recompile every step, or every few steps as a buffer grows, shows more than once).
MIN_NEW_TOKENS = WARMUP_STEPS + 10


_RECOMPILE_CAUSES = (
    "something the step reads changes every step or every few, a Python int (a position or a length) that compile "
    "specialises on, or a shape (a buffer that grows). Keep positions and lengths in tensors, buffers at a fixed size."
)


def backend() -> str:
    """The compiler backend of the property: ``KVVERIFY_COMPILE_BACKEND``, default ``"eager"``."""
    return os.environ.get("KVVERIFY_COMPILE_BACKEND", "eager")


def skip_reason(target: Target) -> str | None:
    """Why the property does not apply to ``target``; None when it does."""
    declaration = target.declaration
    if not declaration.compile:
        return ("the cache does not declare CacheDeclaration(compile=True) (a cache meant for torch.compile and "
                "CUDA graphs, such as a static one, declares it to be checked)")
    if declaration.sliding_window is not None:
        return ("the cache declares a sliding window: the compiled step masks by slot (slot i holds token i), "
                "which a ring's slots do not")
    return None


@st.composite
def compile_cases(draw: st.DrawFn, target: Target) -> Case:
    # invariant: fast numerics, no padding, no ALiBi, no window (what the compiled step decodes), and at least
    # MIN_NEW_TOKENS new tokens, within max_seq_len
    constraints = {**target.config_constraints(), "sliding_window": st.none()}
    limit = target.declaration.max_seq_len or 32
    constraints["max_seq_len"] = st.sampled_from(sorted({min(24, limit), min(32, limit)}))
    case = draw(cases(dtype=("float32", "float64", "bfloat16", "float16"), numerics="fast",
                      positional=("rope", "learned", "none"), left_padding=False, prompt_length=st.integers(1, 8),
                      **constraints), label="case")
    room = case.config.max_seq_len - case.prompt_len
    new = draw(st.integers(min(MIN_NEW_TOKENS, room), room), label="max_new_tokens")
    return Case(case.config, case.prompt, case.pad, new, case.seed)


class RecompileWatch:
    """``watch(index, token, position) -> logits``: the decode step compiled for one example (a fresh dynamo
    state), recompiled without ``fullgraph`` at a graph break, failing as soon as it compiles more than
    :data:`RECOMPILES_ALLOWED` compilations' worth of graphs after :data:`WARMUP_STEPS` steps."""

    def __init__(self, model: ReferenceModel, cache: KVCache) -> None:
        from kvverify.engine.compiled import CompileCounter, PositionStep, compile_step

        torch._dynamo.reset()  # compiled code is cached per code object: every example starts from none
        self.step, self.cache, self.compile = PositionStep(model.weights()), cache, compile_step
        self.counter = CompileCounter(backend())
        self.decode = compile_step(self.step.at, self.counter)
        self.graph_break: str | None = None  # why fullgraph failed, when it did
        self.first = self.warmup = 0  # graphs compiled by the first step (one compilation), by the warm-up's end

    @property
    def how(self) -> str:
        return "compiled" + (f" with graph breaks ({self.graph_break})" if self.graph_break else " (fullgraph)")

    def __call__(self, index: int, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        counter = self.counter
        try:
            logits = self.decode(token, self.cache, position)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise AssertionError(f"the decode step hit dynamo's recompile limit after {counter.graphs} graphs in "
                                 f"{index + 1} decode steps (dynamic=False): {_RECOMPILE_CAUSES}") from None
        except torch._dynamo.exc.Unsupported as error:  # a graph break under fullgraph: compile around it
            if self.graph_break is not None or counter.graphs:
                raise
            self.graph_break = str(error).splitlines()[0]
            self.decode = self.compile(self.step.at, counter, fullgraph=False)
            logits = self.decode(token, self.cache, position)
        self.first = counter.graphs if index == 0 else self.first
        self.warmup = counter.graphs if index + 1 == WARMUP_STEPS else self.warmup
        recompiles, allowed = counter.graphs - self.warmup, RECOMPILES_ALLOWED * max(1, self.first)
        assert index + 1 <= WARMUP_STEPS or recompiles <= allowed, (
            f"the decode step {self.how} compiled {recompiles} more graph(s) within {index + 1 - WARMUP_STEPS} "
            f"decode steps after a warm-up of {WARMUP_STEPS} (allowed: {allowed}, one compilation; dynamic=False): "
            f"{_RECOMPILE_CAUSES}"
        )
        return logits


def greedy(model: ReferenceModel, cache: KVCache, prompt: torch.Tensor, new_tokens: int,
           decode: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> Generation:
    """Prefill ``cache`` through the eager model, then ``decode(index, token (B, 1), position (1,))`` -> logits
    for each further token (``position`` is advanced in place, as gpt-fast's ``input_pos``)."""
    logits = model(prompt, cache=cache, last_only=True)[:, -1]
    position = torch.full((1,), prompt.shape[1], dtype=torch.long, device=prompt.device)
    chosen, chosen_logits = [], []
    for index in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        chosen.append(token)
        chosen_logits.append(logits)
        if index + 1 < new_tokens:
            logits = decode(index, token, position)
            position += 1
    return _generation(prompt, chosen, chosen_logits)


def graphed_decode(model: ReferenceModel, cache: KVCache) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The eager step captured in a CUDA graph at the first decode position and replayed for the rest."""
    from kvverify.engine.compiled import PositionStep
    from kvverify.engine.graphs import GraphedStep

    step = PositionStep(model.weights())
    graphed: list[GraphedStep] = []

    def decode(index: int, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if not graphed:
            graphed.append(GraphedStep(step.at, cache, token, position))
        return graphed[0](token, position)

    return decode


def _generation(prompt: torch.Tensor, chosen: list[torch.Tensor], logits: list[torch.Tensor]) -> Generation:
    tokens = torch.cat(chosen, dim=1)  # (B, N)
    sequences = torch.cat((prompt, tokens), dim=1)
    return Generation(tokens=tokens, logits=torch.stack(logits, dim=1), sequences=sequences,
                      attention_mask=torch.ones_like(sequences), cache=None)


@torch.no_grad()
def check_compiled(target: Target, case: Case) -> None:
    model, prompt, new = case.model(), case.tokens(), case.max_new_tokens
    expected = generate(model, prompt, new, cache=target.new_cache(case.config))
    cache = target.factory(case.config)
    watch = RecompileWatch(model, cache)
    with _quiet_dynamo():
        actual = greedy(model, cache, prompt, new, watch)
    expect_same(target, case, expected, actual, f"generation with the decode step {watch.how} differs from eager",
                label="compiled")
    if torch.device(case.config.device).type == "cuda":
        cache = target.factory(case.config)
        replayed = greedy(model, cache, prompt, new, graphed_decode(model, cache))
        expect_same(target, case, expected, replayed, "replaying the decode step captured in a CUDA graph "
                    "differs from eager (a buffer reallocated after the capture leaves the graph on the old one)",
                    label="CUDA graph replay")


@contextmanager
def _quiet_dynamo() -> Iterator[None]:
    """dynamo's warnings (recompile limits, graph breaks) off: the property reports what they would say."""
    log = logging.getLogger("torch._dynamo")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


COMPILED = Property(
    name="compiled",
    summary=(
        "For a cache declaring compile=True, generation with the decode step under torch.compile (fullgraph, "
        "dynamic=False) equals eager, with at most one recompile after warm-up, and on CUDA a captured CUDA "
        "graph replayed equals eager: Python-int positions or lengths compile specialises on, buffers that "
        "grow or are reallocated, graph breaks in update."
    ),
    needs=frozenset(),
    strategy=compile_cases,
    check=check_compiled,
    skip=skip_reason,
    confirm_in_strict=False,  # the compiled step runs the standard kernels whatever the config's numerics
)
