"""The oracle: each request generated alone, with no cache, under the batch-invariant kernels.

Step t runs the whole sequence (prompt and the t tokens chosen before) through the model with eager attention and
keeps the last position's logits: nothing is cached, paged, shared or batched, so whatever the engine did to the
request, its tokens and logits must come out bit for bit the same. Results are memoised per (model, prompt) in
this process: Hypothesis replays schedules while shrinking, and property 2 runs a request twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvverify.engines.kernels import invariant_kernels
from kvverify.engines.models import build_model
from kvverify.engines.schedule import ModelSpec

_MEMO_LIMIT = 4096  # (model, prompt) pairs kept; cleared when full


@dataclass
class Alone:
    """A request's greedy generation alone: ``tokens[t]`` chosen from ``logits[t]`` (vocab,)."""

    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


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
