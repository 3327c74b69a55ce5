"""The decode engines a profile can time the reference model with: ``eager``
(:class:`~kvverify.engine.decode.DecodeStep`, what ``ReferenceModel.generate`` runs) and ``compiled``
(:mod:`kvverify.engine.compiled`: inductor, and a CUDA graph on CUDA), and their side-by-side ratios against
transformers.

The compiled engine needs a static cache: its ratios time the built-in :class:`~kvverify.caches.StaticCache`,
sized to the generation (prompt + new tokens, as gpt-fast sizes its cache), against transformers' caches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvverify.adapters.hf.generation import cache_keyword, library_generate
from kvverify.caches import StaticCache
from kvverify.engine.compiled import CompiledDecoder, CompiledStep
from kvverify.profiling import timing
from kvverify.reference.model import ReferenceModel

ENGINES: tuple[str, ...] = ("eager", "compiled")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def generation_cache(model: ReferenceModel, batch: int, length: int) -> StaticCache:
    """A static cache of ``batch`` rows and ``length`` slots for ``model``."""
    c = model.config
    return StaticCache(n_layers=c.n_layers, max_batch_size=batch, n_kv_heads=c.n_kv_heads, max_seq_len=length,
                       head_dim=c.head_dim, dtype=c.dtype, device=c.device)


def compiled_step(model: ReferenceModel, max_len: int) -> timing.StepFn:
    """A step function (see :mod:`~kvverify.profiling.timing`) whose one-token decode runs the engine's
    :class:`~kvverify.engine.compiled.CompiledStep` (inductor; replayed from a CUDA graph per cache on CUDA);
    prefill runs the eager model. Its caches must be static ones of ``max_len`` slots."""
    decode = CompiledStep(model, max_len)
    position = torch.zeros(1, dtype=torch.long, device=model.config.device)

    @torch.no_grad()
    def run(tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        if cache is None or tokens.shape[1] != 1:
            logits: torch.Tensor = model(tokens, cache=cache, start=start, last_only=True)[:, -1]
            return logits
        position.fill_(start)
        return decode(tokens, cache, position)

    return run


def forward_ratio(model: ReferenceModel, llama: Any, make_theirs: Callable[[], Any], prompt: torch.Tensor,
                  new_tokens: int, rounds: int) -> timing.Ratio:
    """The compiled engine with a static cache of the generation's length (first) against ``LlamaForCausalLM``
    with ``make_theirs()`` (second), one greedy loop driving both."""
    batch, length = prompt.shape[0], prompt.shape[1] + new_tokens
    ours, theirs = compiled_step(model, length), timing.llama_step(llama)
    return timing.alternating(
        lambda: timing.greedy_seconds_per_token(ours, lambda: generation_cache(model, batch, length), prompt,
                                                new_tokens),
        lambda: timing.greedy_seconds_per_token(theirs, make_theirs, prompt, new_tokens),
        rounds,
    )


def generate_ratio(model: ReferenceModel, llama: Any, make_theirs: Callable[[], Any], prompt: torch.Tensor,
                   new_tokens: int, rounds: int) -> timing.Ratio | None:
    """:meth:`CompiledDecoder.generate` (first) against ``LlamaForCausalLM.generate`` (second); None when the
    two choose different tokens."""
    decoder = CompiledDecoder(model, max_len=prompt.shape[1] + new_tokens, batch_size=prompt.shape[0])
    keyword = cache_keyword(llama)

    def ours(cache: Any) -> torch.Tensor:
        return torch.cat((prompt, decoder.generate(prompt, new_tokens)[0]), dim=1)

    def theirs(cache: Any) -> torch.Tensor:
        return library_generate(llama, prompt, new_tokens, cache, keyword)

    if not torch.equal(ours(None), theirs(make_theirs())):
        return None
    return timing.alternating(
        lambda: timing.generate_seconds_per_token(ours, lambda: None, new_tokens),
        lambda: timing.generate_seconds_per_token(theirs, make_theirs, new_tokens),
        rounds,
    )
