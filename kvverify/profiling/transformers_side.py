"""transformers' side of a comparison: the reference weights in ``LlamaForCausalLM`` and its own caches."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kvverify.reference.config import ModelConfig
from kvverify.reference.model import ReferenceModel

#: transformers' caches profiled beside the built-in ones, by report name: factories in kvverify.adapters.hf.
HF_CACHES: dict[str, str] = {"hf-dynamic": "dynamic_cache", "hf-static": "static_cache"}


def llama_from(model: ReferenceModel) -> Any:
    """``LlamaForCausalLM`` with the reference's weights and transformers' default (SDPA) attention."""
    from kvverify.adapters.llama import to_llama

    return to_llama(model, attn_implementation="sdpa")


def hf_cache(name: str, config: ModelConfig) -> Any:
    """A fresh transformers cache for ``config`` by report name (``hf-dynamic``, ``hf-static``)."""
    from kvverify.adapters import hf

    factory = getattr(hf, HF_CACHES[name])
    return factory(config)


def cache_keyword(llama: Any) -> str:
    """The forward argument that takes a cache: ``cache`` in recent transformers v5, ``past_key_values`` before."""
    parameters = inspect.signature(llama.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def llama_logits(llama: Any, tokens: torch.Tensor, cache: Any | None, keyword: str) -> torch.Tensor:
    """Last-position logits (B, vocab) of ``tokens`` (B, T), appending them to ``cache`` when one is given."""
    if cache is None:
        out = llama(tokens, use_cache=False, logits_to_keep=1)
    else:
        out = llama(tokens, use_cache=True, logits_to_keep=1, **{keyword: cache})
    logits: torch.Tensor = out.logits[:, -1]
    return logits


@torch.no_grad()
def llama_generate(llama: Any, prompt: torch.Tensor, new_tokens: int, cache: Any, keyword: str) -> torch.Tensor:
    """transformers' own greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt`` (B, T), unpadded,
    into ``cache``: the path a transformers user takes. Returns the sequences (B, T + new_tokens)."""
    sequences: torch.Tensor = llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **{keyword: cache},
    )
    return sequences
