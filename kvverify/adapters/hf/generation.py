"""Running a transformers model: one forward's last logits, or transformers' own greedy ``generate``."""

from __future__ import annotations

import inspect
from typing import Any

import torch


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
