"""The reference model's weights in transformers' ``LlamaForCausalLM``: evidence that it is a real transformer.

Only the Llama shape converts: ``positional="rope"``, ``norm="rms"`` and no sliding window (Mistral's window
is not Llama's). The converted model computes with the standard kernels, so it matches the reference in
either numerics up to float rounding (within 1e-5 in float32), not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify.adapters import import_transformers
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import Block, ReferenceModel

#: The fields a convertible config must have, with the value Llama needs.
LLAMA_SHAPE: dict[str, object] = {"positional": "rope", "norm": "rms", "sliding_window": None}


def check_convertible(config: ModelConfig) -> None:
    """Raise ValueError naming the first field that Llama cannot represent."""
    for field, needed in LLAMA_SHAPE.items():
        value = getattr(config, field)
        if value != needed:
            raise ValueError(
                f"ModelConfig.{field}={value!r} cannot be converted to LlamaForCausalLM, which needs "
                f"{field}={needed!r}; build the reference model with {field}={needed!r} to compare it "
                "with transformers."
            )
    if config.d_model % config.n_heads != 0:
        raise ValueError(
            f"ModelConfig.d_model={config.d_model} is not a multiple of n_heads={config.n_heads}, which "
            "transformers' LlamaConfig requires (even with an explicit head_dim); choose a d_model that is."
        )


def llama_config(config: ModelConfig, **overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` of the same shape: no biases, untied embeddings, the same RoPE theta
    and norm epsilon. ``overrides`` are passed to ``LlamaConfig`` (e.g. ``attn_implementation``)."""
    check_convertible(config)
    transformers = import_transformers()
    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        dtype=config.dtype,
    )
    return transformers.LlamaConfig(**{**fields, **overrides})


@torch.no_grad()
def to_llama(model: ReferenceModel, attn_implementation: str = "eager") -> Any:
    """A ``LlamaForCausalLM`` (``"eager"`` or ``"sdpa"`` attention) holding a copy of the reference weights,
    in the reference's dtype and device, in eval mode."""
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa'; got {attn_implementation!r}.")
    config = model.config
    transformers = import_transformers()
    hf_config = llama_config(config)
    llama = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation=attn_implementation)
    llama.to(dtype=config.dtype, device=config.device).eval()
    target = llama.model
    target.embed_tokens.weight.copy_(model.tok_embeddings)  # (vocab, d_model)
    for ours, theirs in zip(model.layers, target.layers, strict=True):
        assert isinstance(ours, Block)
        attn, mlp = theirs.self_attn, theirs.mlp
        attn.q_proj.weight.copy_(ours.attn.wq)  # (n_heads * head_dim, d_model)
        attn.k_proj.weight.copy_(ours.attn.wk)  # (n_kv_heads * head_dim, d_model)
        attn.v_proj.weight.copy_(ours.attn.wv)
        attn.o_proj.weight.copy_(ours.attn.wo)  # (d_model, n_heads * head_dim)
        mlp.gate_proj.weight.copy_(ours.mlp.w_gate)  # (d_ff, d_model)
        mlp.up_proj.weight.copy_(ours.mlp.w_up)
        mlp.down_proj.weight.copy_(ours.mlp.w_down)  # (d_model, d_ff)
        theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
        theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
    target.norm.weight.copy_(model.final_norm.weight)
    llama.lm_head.weight.copy_(model.lm_head)  # (vocab, d_model)
    return llama

