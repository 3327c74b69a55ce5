"""The reference model's weights as plain tensors, what :meth:`ReferenceModel.weights` hands other code (the
decode engine, adapters) instead of its modules. Weights are (d_out, d_in), as ``nn.Linear`` stores them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvverify.protocol.config import ModelConfig


@dataclass(frozen=True)
class NormWeights:
    weight: torch.Tensor  # (d_model,)
    bias: torch.Tensor | None  # (d_model,) for LayerNorm; None for RMSNorm


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: NormWeights
    wq: torch.Tensor  # (n_heads * head_dim, d_model)
    wk: torch.Tensor  # (n_kv_heads * head_dim, d_model)
    wv: torch.Tensor  # (n_kv_heads * head_dim, d_model)
    wo: torch.Tensor  # (d_model, n_heads * head_dim)
    mlp_norm: NormWeights
    w_gate: torch.Tensor  # (d_ff, d_model)
    w_up: torch.Tensor  # (d_ff, d_model)
    w_down: torch.Tensor  # (d_model, d_ff)


@dataclass(frozen=True)
class ModelWeights:
    """Every weight of one model and the configuration they are for. The tensors are the model's own (detached,
    not copied): read them, do not write them."""

    config: ModelConfig
    tok_embeddings: torch.Tensor  # (vocab_size, d_model)
    pos_embeddings: torch.Tensor | None  # (max_seq_len, d_model) with learned positions
    layers: tuple[LayerWeights, ...]
    final_norm: NormWeights
    lm_head: torch.Tensor  # (vocab_size, d_model)
