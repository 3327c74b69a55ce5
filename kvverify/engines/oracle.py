"""The oracles: what each request of a schedule must come out as, and how closely.

- :class:`AloneOracle`, bit for bit: each request generated alone, with no cache, under the batch-invariant
  kernels, on the transformers model of the spec (:func:`alone`). Step t runs the whole sequence (prompt and the t
  tokens chosen before) through the model with eager attention and keeps the last position's logits: nothing is
  cached, paged, shared or batched, so whatever the engine did to the request, its tokens and logits must come
  out bit for bit the same. Results are memoised per (model, prompt) in this process: Hypothesis replays
  schedules while shrinking, and property 2 runs a request twice.
- :class:`ReferenceOracle`, within a tolerance: kvverify's own reference model in strict numerics, for an engine
  whose kernels kvverify cannot reach (vLLM's C++). It is teacher-forced on the engine's tokens: one uncached
  forward over the prompt and the tokens gives, at each position, the logits of that prefix computed alone
  (strict numerics make a row's bits independent of the other rows), so a near tie splits nothing and every step
  is compared.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvverify.engines.kernels import invariant_kernels
from kvverify.engines.models import build_model
from kvverify.engines.schedule import ModelSpec
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

_MEMO_LIMIT = 4096  # (model, prompt) pairs kept; cleared when full


@dataclass
class Alone:
    """A request's greedy generation alone: ``tokens[t]`` chosen from ``logits[t]`` (vocab,)."""

    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


class Oracle(Protocol):
    """What a request must come out as: ``atol`` None, bit for bit; a float, every logit within it and every
    token the oracle's argmax but at a near tie (the top two closer than twice ``atol``: ``verify-hf``'s rule)."""

    atol: float | None

    def expected(self, model: ModelSpec, prompt: tuple[int, ...], tokens: Sequence[int], new_tokens: int) -> Alone:
        """The request's ``new_tokens`` tokens and logits; ``tokens``, what the engine chose, for an oracle
        teacher-forced on them (it then gives one row per token the engine chose)."""
        ...


_memo: dict[tuple[ModelSpec, tuple[int, ...]], Alone] = {}


def alone(model: ModelSpec, prompt: tuple[int, ...], new_tokens: int) -> Alone:
    """The first ``new_tokens`` greedy tokens after ``prompt``, each with its logits, with no cache."""
    key = (model, prompt)
    if len(_memo) >= _MEMO_LIMIT and key not in _memo:
        _memo.clear()
    done = _memo.setdefault(key, Alone())
    if len(done.tokens) < new_tokens:
        _extend(model, prompt, done, new_tokens)
    return Alone(done.tokens[:new_tokens], done.logits[:new_tokens])


def _extend(spec: ModelSpec, prompt: tuple[int, ...], done: Alone, new_tokens: int) -> None:
    net = build_model(spec)
    before = net.config._attn_implementation
    net.set_attn_implementation("eager")
    try:
        with invariant_kernels(), torch.no_grad():
            while len(done.tokens) < new_tokens:
                sequence = torch.tensor([[*prompt, *done.tokens]])  # (1, T)
                logits = net(sequence, use_cache=False, logits_to_keep=1).logits[0, -1].float()  # (vocab,)
                done.logits.append(logits.clone())
                done.tokens.append(int(logits.argmax()))
    finally:
        net.set_attn_implementation(before)


class AloneOracle:
    """Bit for bit: :func:`alone` (the engine's tokens are not needed)."""

    atol: float | None = None

    def expected(self, model: ModelSpec, prompt: tuple[int, ...], tokens: Sequence[int], new_tokens: int) -> Alone:
        return alone(model, prompt, new_tokens)


class ReferenceOracle:
    """Within ``atol``: the reference model of ``config`` (strict numerics, float32) with the weights of the
    spec's seed, teacher-forced on the engine's tokens. ``why``: how the tolerance was measured, for reports."""

    def __init__(self, config: ModelConfig, atol: float, why: str) -> None:
        if config.numerics != "strict":
            raise ValueError(f"ReferenceOracle needs strict numerics (a row's bits independent of the other rows); "
                             f"got numerics={config.numerics!r}")
        self.config, self.atol, self.why = config, atol, why

    def model(self, spec: ModelSpec) -> ReferenceModel:
        """The reference model the spec names: this oracle's config, weights drawn from ``spec.seed``."""
        if spec.layers != "full" or spec.vocab != self.config.vocab_size:
            raise ValueError(f"the reference oracle serves full-attention models of vocab {self.config.vocab_size}; "
                             f"got layers={spec.layers!r}, vocab={spec.vocab}")
        return _reference_model(self.config, spec.seed)

    def expected(self, model: ModelSpec, prompt: tuple[int, ...], tokens: Sequence[int], new_tokens: int) -> Alone:
        if not tokens:
            return Alone()
        net = self.model(model)
        sequence = torch.tensor([[*prompt, *tokens[:-1]]], device=net.config.device)  # (1, T + N - 1)
        with torch.no_grad():
            logits = net(sequence)[0, len(prompt) - 1:].float().cpu()  # (N, vocab)
        return Alone(logits.argmax(-1).tolist(), list(logits))


@functools.lru_cache(maxsize=4)
def _reference_model(config: ModelConfig, seed: int) -> ReferenceModel:
    return ReferenceModel(config, seed=seed)
