"""Run a program (:mod:`~kvverify.adapters.llamacpp.programs`) on one llama.cpp context and check every step.

After each operation the context must hold exactly the tokens the program says it holds (``input_ids[:n_tokens]``);
llama.cpp's memory must hold exactly their positions (``llama_memory_seq_pos_min/max``); every kept row of
``Llama.scores`` must match a fresh evaluation of those tokens within ``atol``; and every token a greedy generation
chose must be the argmax of the fresh logits (unless the top two are within the tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvverify.adapters.llamacpp import session
from kvverify.adapters.llamacpp.oracle import FreshEval, greedy_ambiguous, largest_difference
from kvverify.adapters.llamacpp.programs import Complete, Crop, Eval, Generate, Load, Operation, Save
from kvverify.adapters.llamacpp.session import ContextSpec


@dataclass(frozen=True)
class Outcome:
    """largest: the largest logit difference seen; failure: what went wrong, None when every step held."""

    largest: float
    failure: str | None = None


class Interpreter:
    """One fresh context, the tokens it should hold, the states saved so far and every sequence seen."""

    def __init__(self, spec: ContextSpec, oracle: FreshEval, atol: float, *, avoid_known: bool = False) -> None:
        # avoid_known: skip a generation whose prompt is exactly the tokens held right after a crop (the known
        # stale-logits failure, kvverify.adapters.llamacpp.known), so a search can look past it
        self.spec, self.oracle, self.atol, self.avoid_known = spec, oracle, atol, avoid_known
        # a crop lowered n_tokens and nothing has evaluated since: the context's last logits are not those of the
        # last token held (what the known failure samples from)
        self.stale = False
        self.llama: Any = session.open_context(spec)
        self.held: list[int] = []
        self.saved: dict[int, tuple[Any, list[int]]] = {}
        self.seen: list[tuple[int, ...]] = []
        self.largest = 0.0
        self.cache_set = False

    def run(self, program: list[Operation]) -> Outcome:
        for i, op in enumerate(program):
            problem = self.step(op)
            if problem is not None:
                return Outcome(self.largest, f"step {i}, {op!r}: {problem}")
        return Outcome(self.largest)

    def room(self) -> int:
        """Tokens that still fit, one kept back for a generation's last choice."""
        return self.spec.n_ctx - 1 - len(self.held)

    def step(self, op: Operation) -> str | None:
        if isinstance(op, Eval):
            tokens = list(op.tokens[: self.room()])
            session.evaluate(self.llama, tokens)
            self.held += tokens
            self.stale = self.stale and not tokens
        elif isinstance(op, Crop):
            keep = min(op.keep, len(self.held)) if op.keep >= 0 else max(0, len(self.held) + op.keep)
            if not session.crop(self.llama, keep):
                return f"llama_memory_seq_rm(mem, -1, {keep}, -1) returned false on a {len(self.held)}-token context"
            self.stale = self.stale or keep < len(self.held)
            self.held = self.held[:keep]
        elif isinstance(op, Save):
            self.saved[op.slot] = (session.save_state(self.llama), list(self.held))
        elif isinstance(op, Load):
            if op.slot in self.saved:
                state, tokens = self.saved[op.slot]
                session.load_state(self.llama, state)
                self.held = list(tokens)
                self.stale = False
        else:
            problem = self.prompted(op)
            if problem is not None:
                return problem
        self.seen.append(tuple(self.held))
        return self.check()

    def prompt(self, op: Generate | Complete) -> list[int]:
        base = self.seen[-1 - op.source % len(self.seen)][: op.keep] if self.seen else ()
        prompt = [*base, *op.extra]
        return prompt[: max(0, self.spec.n_ctx - 1 - op.n_new)]

    def prompted(self, op: Generate | Complete) -> str | None:
        prompt = self.prompt(op)
        if not prompt or (self.avoid_known and self.stale and prompt == self.held):
            return None
        self.stale = self.stale and prompt == self.held and op.n_new == 1  # else it evaluates a token
        if isinstance(op, Generate):
            chosen = session.generate(self.llama, prompt, op.n_new)
            self.held = prompt + chosen[:-1]  # the last choice is not evaluated yet
            return self.greedy(prompt, chosen, f"Llama.generate chose {chosen}")
        if not self.cache_set:
            self.llama.set_cache(session.ram_cache())
            self.cache_set = True
        session.complete(self.llama, prompt, op.n_new)
        held = session.held_tokens(self.llama)
        if held[: len(prompt)] != prompt or len(held) > len(prompt) + op.n_new - 1:
            return (f"after create_completion of {len(prompt)} prompt tokens and at most {op.n_new} new ones, the "
                    f"context holds {held}; expected the prompt {prompt} followed by at most {op.n_new - 1} tokens")
        self.held = held
        return self.greedy(prompt, held[len(prompt):], "create_completion")

    def greedy(self, prompt: list[int], chosen: list[int], what: str) -> str | None:
        """Each chosen token is the argmax of the fresh logits of the position before it."""
        fresh = self.oracle.logits((prompt + chosen)[:-1])  # (L + n - 1, vocab): row L - 1 + j chose token j
        for j, token in enumerate(chosen):
            row = fresh[len(prompt) - 1 + j]
            want = int(np.argmax(row))
            if token != want and not greedy_ambiguous(row, self.atol):
                return (f"{what}: token {j} after the {len(prompt)}-token prompt is {token}, but a fresh evaluation's "
                        f"greedy choice is {want} (logits {row[token]:.6g} vs {row[want]:.6g})")
        return None

    def check(self) -> str | None:
        held = session.held_tokens(self.llama)
        if held != self.held:
            return f"the context holds {held} (n_tokens={len(held)}); expected {self.held}"
        positions, want_positions = session.memory_positions(self.llama), (0, len(held) - 1) if held else (-1, -1)
        if positions != want_positions:
            return (f"llama.cpp's memory holds positions {positions[0]}..{positions[1]} (llama_memory_seq_pos_min/max) "
                    f"while the context says it holds {len(held)} tokens; expected {want_positions[0]}.."
                    f"{want_positions[1]}")
        got = session.logits(self.llama, 0, len(held))  # (T, vocab)
        want = self.oracle.logits(held)
        if got.size == 0:
            return None
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max(axis=-1)  # (T,)
        diff = np.nan_to_num(diff, nan=np.inf)
        self.largest = max(self.largest, largest_difference(got, want))
        if float(diff.max()) > self.atol:
            bad = [int(p) for p in np.flatnonzero(diff > self.atol)]
            return (f"Llama.scores rows {bad} of {len(held)} differ from a fresh evaluation of the same tokens by up "
                    f"to {float(diff.max()):.3g} (tolerance {self.atol:g})")
        return None

    def close(self) -> None:
        self.llama.close()
