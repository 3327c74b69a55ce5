"""The tiny transformers models an engine schedule runs: built from :class:`~kvverify.engines.schedule.ModelSpec`
with random weights (no hub), one per spec and process.

full: Llama; sliding: Mistral with a sliding window on every layer; mixed: Qwen2 alternating sliding and full
layers. Each has 2 layers of 4 query and 2 KV heads of head_dim 8, float32, and no end-of-sequence token, so
every request generates exactly its ``max_new_tokens``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kvverify.adapters import import_transformers
from kvverify.engines.schedule import ModelSpec

#: Positions a model accepts: past the longest prompt plus generation a strategy draws.
MAX_POSITIONS = 1024


def model_config(spec: ModelSpec) -> Any:
    """The transformers config of ``spec``'s model."""
    tf = import_transformers()
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2,  # spreads the logits, so greedy choices are rarely near ties
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if spec.layers == "full":
        return tf.LlamaConfig(**common)
    if spec.layers == "sliding":
        return tf.MistralConfig(sliding_window=spec.window, **common)
    return tf.Qwen2Config(use_sliding_window=True, sliding_window=spec.window,
                          layer_types=["sliding_attention", "full_attention"], **common)


@functools.lru_cache(maxsize=8)
def build_model(spec: ModelSpec) -> Any:
    """``spec``'s model in eval mode, weights drawn from ``spec.seed`` (a generator of its own: torch's global one
    is left alone). Cached: callers switch its attention implementation and must switch it back."""
    tf = import_transformers()
    config = model_config(spec)
    config._attn_implementation = "eager"
    devices: Any = torch.random.fork_rng(devices=[])
    with devices:
        torch.manual_seed(spec.seed)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()
