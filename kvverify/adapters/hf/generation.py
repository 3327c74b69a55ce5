"""Greedy generation with a transformers model: uncached, teacher-forced into a cache, or transformers' own
``generate``; results as :class:`~kvverify.reference.model.Generation`, for :mod:`kvverify.checks.compare`.

Positions follow the reference model: ``cumsum(mask) - 1``, so left padding does not shift them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kvverify.reference.model import Generation


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference model's positions: ``cumsum(mask) - 1``, so left padding does not shift them.

    attention_mask: (B, N) of 0/1 -> (B, N) long.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_keyword(model: Any) -> str:
    """The forward argument that takes a cache: ``cache`` in recent transformers v5, ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def last_logits(model: Any, tokens: torch.Tensor, cache: Any | None, keyword: str) -> torch.Tensor:
    """Last-position logits (B, vocab) of ``tokens`` (B, T), appending them to ``cache`` when one is given."""
    if cache is None:
        out = model(tokens, use_cache=False, logits_to_keep=1)
    else:
        out = model(tokens, use_cache=True, logits_to_keep=1, **{keyword: cache})
    logits: torch.Tensor = out.logits[:, -1]
    return logits


@torch.no_grad()
def library_generate(model: Any, prompt: torch.Tensor, new_tokens: int, cache: Any, keyword: str) -> torch.Tensor:
    """transformers' own greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt`` (B, T), unpadded,
    into ``cache``: the path a transformers user takes. Returns the sequences (B, T + new_tokens)."""
    sequences: torch.Tensor = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **{keyword: cache},
    )
    return sequences


@torch.no_grad()
def uncached_greedy(model: Any, prompt: torch.Tensor, mask: torch.Tensor, steps: int) -> Generation:
    """Greedy recomputation, ``x[1:t+1] = LLM(x[1:t])``: the whole prefix each step, no cache.

    prompt, mask: (B, T). The Generation's tokens are (B, steps), its logits (B, steps, vocab).
    """
    tokens, logits = [], []
    sequences = prompt
    for _ in range(steps):
        out = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False)
        step = out.logits[:, -1].float()  # (B, vocab)
        token = step.argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(token)
        logits.append(step)
        sequences = torch.cat((sequences, token), dim=1)
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
    return Generation(torch.cat(tokens, dim=1), torch.stack(logits, dim=1), sequences, mask, None)


@torch.no_grad()
def teacher_forced(
    model: Any, prompt: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, cache: Any
) -> Generation:
    """Prefill ``prompt`` (B, T) into ``cache``, then feed ``tokens`` (B, N) one per step, whatever the model
    would have chosen: up to the first differing token this *is* free-running greedy generation, and after it
    the logits stay comparable. The Generation's logits (B, N, vocab): step ``i`` is the prediction after
    ``prompt`` and ``tokens[:, :i]``; its tokens are the model's greedy choices, its sequences the tokens fed.
    """
    full_mask = torch.cat((mask, torch.ones_like(tokens)), dim=1)  # (B, T + N)
    positions = position_ids_from_mask(full_mask)
    keyword = cache_keyword(model)
    inputs, start, logits = prompt, 0, []
    for i in range(tokens.shape[1]):
        end = prompt.shape[1] + i
        out = model(input_ids=inputs, attention_mask=full_mask[:, :end], position_ids=positions[:, start:end],
                    use_cache=True, **{keyword: cache})
        logits.append(out.logits[:, -1].float())  # (B, vocab)
        inputs, start = tokens[:, i : i + 1], end
    stacked = torch.stack(logits, dim=1)  # (B, N, vocab)
    return Generation(stacked.argmax(-1), stacked, torch.cat((prompt, tokens), dim=1), full_mask, cache)
