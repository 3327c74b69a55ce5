"""Checks on what a caller hands the reference model: clear errors instead of tracebacks from inside torch."""

from __future__ import annotations

import torch

from kvverify.protocol import KVCache
from kvverify.reference.config import ModelConfig


class InputError(ValueError):
    """An argument to the reference model is malformed; the message says what was expected and what came."""


def check_generate_inputs(
    config: ModelConfig,
    prompt: object,
    max_new_tokens: object,
    attention_mask: object,
    use_cache: bool,
    cache: KVCache | None,
) -> torch.Tensor:
    """Validate the arguments of ``generate`` and return the attention mask (B, T) as a long tensor."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        got = f"{type(prompt).__name__} {getattr(prompt, 'dtype', '')} {tuple(getattr(prompt, 'shape', ()))}"
        raise InputError(f"prompt must be a (batch, seq) torch.long tensor; got {got.strip()}.")
    batch, length = prompt.shape
    if batch < 1 or length < 1:
        raise InputError(f"prompt must hold at least one token in one row; got shape {tuple(prompt.shape)}.")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}.")
    if batch > config.max_batch_size:
        raise InputError(
            f"prompt has batch {batch} but config.max_batch_size is {config.max_batch_size}; "
            "raise max_batch_size or split the batch."
        )
    if length + max_new_tokens - 1 > config.max_seq_len:
        raise InputError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} needs {length + max_new_tokens - 1} "
            f"positions but config.max_seq_len is {config.max_seq_len}; raise max_seq_len or generate less."
        )
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= config.vocab_size:
        raise InputError(f"prompt token ids must lie in [0, {config.vocab_size}); got ids from {low} to {high}.")
    if attention_mask is None:
        mask = torch.ones_like(prompt)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(prompt.shape):
            shape = tuple(getattr(attention_mask, "shape", ()))
            got = str(shape) if shape else type(attention_mask).__name__
            raise InputError(f"attention_mask must have the prompt's shape {tuple(prompt.shape)}; got {got}.")
        mask = attention_mask.long()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token).")
        if not bool((mask.diff(dim=1) >= 0).all()) or not bool(mask[:, -1].all()):
            raise InputError(
                "attention_mask must describe left padding: zeros, then ones, with a token in the last column."
            )
    if not use_cache and cache is not None:
        raise InputError("a cache was passed with use_cache=False; pass use_cache=True or drop the cache.")
    if cache is not None:
        past: object = cache.get_seq_length()
        if isinstance(past, torch.Tensor) and past.numel() == 1 and not past.is_floating_point():
            past = int(past)  # transformers' static caches return a 0-d tensor
        if not isinstance(past, int) or past < 0 or past >= length:
            raise InputError(
                f"the cache holds {past!r} tokens but the prompt has {length}: pass the whole sequence "
                "(the tokens the cache holds, then at least one new token)."
            )
    return mask.to(prompt.device)
