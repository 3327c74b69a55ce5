"""Tiny random-weight transformers models, built from a config (no hub access): the models ``verify-hf`` runs.

Each is float32 with 2 layers, GQA (4 query, 2 KV heads) except GPT-2, which has no GQA; Mistral and Gemma 2
have a sliding window shorter than the generations (Gemma 2 alternates sliding and full layers and soft-caps
attention and final logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvverify.adapters import import_transformers

WINDOW = 4  # the sliding window of mistral and gemma2: shorter than the generation


def _common(**extra: Any) -> dict[str, Any]:
    # initializer_range 0.2 spreads the logits (std ~1.5) so greedy choices are rarely near ties
    return dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra,
    )


def _gpt2(transformers: Any) -> Any:
    return transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None,
    )


#: The models by name: name -> config(transformers module).
MODELS: dict[str, Callable[[Any], Any]] = {
    "llama": lambda tf: tf.LlamaConfig(**_common()),
    "mistral": lambda tf: tf.MistralConfig(**_common(sliding_window=WINDOW)),
    "qwen2": lambda tf: tf.Qwen2Config(**_common()),
    "gpt2": _gpt2,
    "gemma2": lambda tf: tf.Gemma2Config(**_common(head_dim=16, sliding_window=WINDOW)),
}


def model_config(name: str) -> Any:
    """The transformers config of a model of :data:`MODELS`."""
    return MODELS[name](import_transformers())


def build_model(name: str, seed: int = 0, attn_implementation: str | None = None) -> Any:
    """A model of :data:`MODELS` in eval mode, its weights drawn from ``seed`` (torch's global generator)."""
    torch.manual_seed(seed)
    auto: Any = import_transformers().AutoModelForCausalLM
    return auto.from_config(model_config(name), attn_implementation=attn_implementation).eval()
