"""The reference model written as a Llama checkpoint on disk: ``config.json`` and ``model.safetensors`` in
transformers' ``LlamaForCausalLM`` layout, which serving engines (vLLM) load without a hub or a tokenizer.

Only the Llama shape converts (:data:`LLAMA_SHAPE`: RoPE with rotate-half pairs, RMSNorm, no window, SwiGLU,
no biases, an untied head). The tensors are the reference weights, copied bit for bit in the model's dtype.
The names are transformers' (``model.layers.{i}.self_attn.q_proj.weight``, ...), written without importing
transformers, so the checkpoint can be written in an environment whose transformers kvverify does not support.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

#: The fields a convertible config must have, with the value Llama needs.
LLAMA_SHAPE: dict[str, object] = {"positional": "rope", "norm": "rms", "sliding_window": None}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_convertible(config: ModelConfig) -> None:
    """Raise ValueError naming the first field that a Llama checkpoint cannot represent."""
    for field, needed in LLAMA_SHAPE.items():
        value = getattr(config, field)
        if value != needed:
            raise ValueError(
                f"ModelConfig.{field}={value!r} cannot be written as a Llama checkpoint, which needs "
                f"{field}={needed!r}; build the reference model with {field}={needed!r}."
            )
    if config.dtype not in _DTYPE_NAMES:
        raise ValueError(
            f"ModelConfig.dtype={config.dtype} cannot be written for a serving engine; use one of "
            f"{sorted(_DTYPE_NAMES.values())}."
        )


def llama_config_dict(config: ModelConfig) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` of the same shape: no biases, untied embeddings, the same RoPE
    theta and norm epsilon, and no special tokens (an engine serving it must be told to ignore end of sequence)."""
    check_convertible(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": _DTYPE_NAMES[config.dtype],
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def llama_state_dict(model: ReferenceModel) -> dict[str, torch.Tensor]:
    """The reference weights under transformers' Llama names, as contiguous CPU copies."""
    check_convertible(model.config)
    w = model.weights()
    tensors = {
        "model.embed_tokens.weight": w.tok_embeddings,  # (vocab, d_model)
        "model.norm.weight": w.final_norm.weight,  # (d_model,)
        "lm_head.weight": w.lm_head,  # (vocab, d_model)
    }
    for i, layer in enumerate(w.layers):
        prefix = f"model.layers.{i}."
        tensors |= {
            prefix + "input_layernorm.weight": layer.attn_norm.weight,
            prefix + "self_attn.q_proj.weight": layer.wq,  # (n_heads * head_dim, d_model)
            prefix + "self_attn.k_proj.weight": layer.wk,  # (n_kv_heads * head_dim, d_model)
            prefix + "self_attn.v_proj.weight": layer.wv,
            prefix + "self_attn.o_proj.weight": layer.wo,  # (d_model, n_heads * head_dim)
            prefix + "post_attention_layernorm.weight": layer.mlp_norm.weight,
            prefix + "mlp.gate_proj.weight": layer.w_gate,  # (d_ff, d_model)
            prefix + "mlp.up_proj.weight": layer.w_up,
            prefix + "mlp.down_proj.weight": layer.w_down,  # (d_model, d_ff)
        }
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def write_llama_checkpoint(model: ReferenceModel, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of ``model`` into ``directory`` (created if missing) and
    return it. Needs the ``safetensors`` package (installed with transformers and with vLLM)."""
    try:
        safetensors_torch: Any = importlib.import_module("safetensors.torch")
    except ImportError as error:
        raise ImportError("writing a Llama checkpoint needs safetensors; run: pip install safetensors") from error
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(llama_config_dict(model.config), indent=2) + "\n")
    safetensors_torch.save_file(llama_state_dict(model), str(directory / "model.safetensors"),
                                metadata={"format": "pt"})
    return directory
