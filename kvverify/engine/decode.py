"""One decoded token through a whole model in one function, for fast numerics: what ``ReferenceModel.generate``
runs for every token after the prefill, and what the profiles time as the reference model's decode step.

The module path (:meth:`kvverify.reference.model.ReferenceModel.forward`) spends most of a one-token step on
Python: module calls, a step context, a mask object per layer. :class:`DecodeStep` runs the fast kernels from
flat per-layer tuples (as gpt-fast's ``decode_one_token``) on weights it packs itself when built, with each
residual add fused into the projection before it (``addmm_``). It covers the simple case only: fast numerics,
one new token per row, no padding, no ALiBi, so every key the cache returns is visible (the newest
``sliding_window`` of them with a window). The model runs everything else through its modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from kvverify.protocol.cache import KVCache, written_slots
from kvverify.protocol.config import ModelConfig
from kvverify.reference import fast as kernels
from kvverify.reference.inputs import no_keys_returned
from kvverify.reference.weights import ModelWeights, NormWeights

NormFn = Callable[[torch.Tensor], torch.Tensor]
#: What a query attends to: keys, values (B, Hkv, S', D) and a mask broadcastable to (B, Hkv, group, S') or None.
Keys = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class _Layer(NamedTuple):
    """One block's packed weights (see :func:`pack`)."""

    layer_idx: int
    attn_norm: NormFn  # without its weight where the weight is folded into qkv
    qkv: torch.Tensor  # (d_model, (H + 2 Hkv) * D)
    wo: torch.Tensor  # (H * D, d_model)
    mlp_norm: NormFn  # without its weight where the weight is folded into gate_up
    gate_up: torch.Tensor  # (d_model, 2 d_ff)
    down: torch.Tensor  # (d_ff, d_model)


def supports(config: ModelConfig) -> bool:
    """Whether a model of this configuration can decode with :class:`DecodeStep` (when unpadded)."""
    return config.numerics == "fast" and config.positional != "alibi"


def pack(*weights: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Weights (d_out_i, d_in) concatenated along d_out (QKV, gate-up: one matmul) and transposed, a new
    (d_in, sum of d_out) tensor: ``x @ packed`` reads the weight row by row, the faster layout on CPU for few
    rows. With ``in_scale`` (d_in,), the weight of the RMSNorm before the projection, each input column is
    scaled by it: ``(x * g) @ W.T == x @ (W * g).T``, which saves the norm one multiplication per call."""
    packed = torch.cat([w.t() for w in weights], dim=1)  # (d_in, sum of d_out), a copy
    if in_scale is not None:
        packed.mul_(in_scale[:, None])
    return packed


class DecodeStep:
    """``step(tokens (B, 1), cache, start) -> logits (B, vocab)`` for a token at slot ``start`` of every row,
    without padding, equal to ``model(tokens, cache=cache, start=start)[:, -1]`` for a model that
    :func:`supports` it, up to rounding (packed weights, a fused residual add), for ``start < max_len``
    (default: the model's ``max_seq_len``). It copies ``weights`` when built and reads nothing of the model
    after: build another after changing the model's weights."""

    def __init__(self, weights: ModelWeights, max_len: int | None = None) -> None:
        c = weights.config
        if not supports(c):
            raise ValueError(
                f"DecodeStep needs fast numerics without ALiBi; got numerics={c.numerics!r}, "
                f"positional={c.positional!r}. Use the model itself for this configuration."
            )
        self._n_q, self._n_kv, self._head_dim, self._window = c.n_heads, c.n_kv_heads, c.head_dim, c.sliding_window
        self.max_len = c.max_seq_len if max_len is None else min(max_len, c.max_seq_len)
        layers = []
        for i, w in enumerate(weights.layers):
            attn_norm, attn_scale = _norm(w.attn_norm, c)
            mlp_norm, mlp_scale = _norm(w.mlp_norm, c)
            qkv = pack(w.wq, w.wk, w.wv, in_scale=attn_scale)
            gate_up = pack(w.w_gate, w.w_up, in_scale=mlp_scale)
            layers.append(_Layer(i, attn_norm, qkv, pack(w.wo), mlp_norm, gate_up, pack(w.w_down)))
        self._layers = tuple(layers)
        self._final_norm, final_scale = _norm(weights.final_norm, c)
        self._lm_head = pack(weights.lm_head, in_scale=final_scale)  # (d_model, vocab)
        self._embeddings = weights.tok_embeddings.clone()  # (vocab, d_model)
        positions = weights.pos_embeddings
        self._positions = None if positions is None else positions[: self.max_len].clone()  # (max_len, d_model)
        device = self._embeddings.device
        self._slots = torch.arange(self.max_len, device=device)  # (max_len,): 0, 1, 2... for cache_position
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, signed sin: (max_len, D)
        if c.positional == "rope":
            cos, sin = kernels.rope_tables(self._slots[None], c.head_dim, c.rope_theta, c.dtype)
            self._rope = cos[0, 0], sin[0, 0]

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        # On a CPU a decoded token is the weights' memory traffic plus a fixed cost per kernel call, and that cost
        # grows several-fold right after a projection has streamed its weight through the caches. Hence one fused
        # call where two would do (addmm_ for the residual, norm weights folded into the projections) and lookups
        # instead of per-step tensors (slots, RoPE rows).
        window = self._window
        total = start + 1  # N: tokens in the cache after this step
        x = self._embeddings.index_select(0, tokens.view(tokens.shape[0]))  # (B, d_model), a new tensor
        if self._positions is not None:
            x = x + self._positions[start]
        rope = None if self._rope is None else (self._rope[0][start], self._rope[1][start])  # (D,) each

        def visible(k: torch.Tensor, v: torch.Tensor) -> Keys:
            return (*decode_keys(k, v, total, window), None)

        return self.blocks(x, cache, self._slots[start:total], rope, visible)

    def blocks(
        self,
        x: torch.Tensor,
        cache: KVCache,
        cache_position: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        visible: Callable[[torch.Tensor, torch.Tensor], Keys],
    ) -> torch.Tensor:
        """Every block and the LM head for one token per row: x (B, d_model), updated in place; cache_position
        (1,); rope: cos and signed sin rows, (D,) or (1, D); ``visible(keys, values)`` -> the keys and values the
        query attends to and an attention mask for them (None: all). Returns logits (B, vocab)."""
        n_q, n_kv, head_dim = self._n_q, self._n_kv, self._head_dim
        batch = x.shape[0]
        cache_kwargs = {"cache_position": cache_position}
        qkv_shape = (batch, n_q + 2 * n_kv, 1, head_dim)
        rows_shape = (batch, n_kv, n_q // n_kv, head_dim)  # a KV head's queries as rows (kernels.dense_attention)
        scale = 1.0 / math.sqrt(head_dim)
        mm, sdpa, silu = torch.mm, nn.functional.scaled_dot_product_attention, nn.functional.silu
        for layer_idx, attn_norm, w_qkv, w_o, mlp_norm, w_gate_up, w_down in self._layers:
            qkv = mm(attn_norm(x), w_qkv).view(qkv_shape)  # (B, H + 2 Hkv, 1, D)
            qk, v = qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]  # (B, H + Hkv, 1, D), (B, Hkv, 1, D)
            if rope is not None:
                qk = kernels.apply_rope(qk, *rope)
            k, v = cache.update(qk[:, n_q:], v, layer_idx, cache_kwargs)  # (B, Hkv, S, D)
            k, v, mask = visible(k, v)
            out = sdpa(qk[:, :n_q].reshape(rows_shape), k, v, attn_mask=mask, scale=scale)  # (B, Hkv, H / Hkv, D)
            x.addmm_(out.reshape(batch, n_q * head_dim), w_o)  # reshape: CUDA SDPA returns non-contiguous rows
            gate_up = mm(mlp_norm(x), w_gate_up)  # (B, 2 d_ff)
            d_ff = gate_up.shape[-1] // 2
            x.addmm_(silu(gate_up[:, :d_ff]).mul_(gate_up[:, d_ff:]), w_down)
        return mm(self._final_norm(x), self._lm_head)  # (B, vocab)


def decode_keys(keys: torch.Tensor, values: torch.Tensor, total: int,
                window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values (B, Hkv, S', D) a decode step's one query sees, of what ``update`` returned with
    ``total`` tokens written: the written slots, and of them the newest ``window`` with a sliding window."""
    keys, values = written_slots(keys, values, total)
    held = keys.shape[-2]
    if held == 0 or values.shape[-2] == 0:
        raise no_keys_returned(f"a decode step at slot {total - 1}")
    if window is not None and held > window:
        keys, values = keys[:, :, held - window :], values[:, :, held - window :]
    return keys, values


def _norm(norm: NormWeights, config: ModelConfig) -> tuple[NormFn, torch.Tensor | None]:
    """The norm as the step applies it, and the weight it leaves to the next projection (None: it keeps it).

    RMSNorm in float32 or float64 folds its weight into the projection (see :func:`pack`); reduced precision
    and LayerNorm keep theirs (a snapshot)."""
    weight, bias, eps = norm.weight, norm.bias, config.norm_eps
    if bias is None and weight.dtype in kernels.FULL_PRECISION:
        eps_tensor = torch.tensor(eps, dtype=weight.dtype, device=weight.device)
        return (lambda x: kernels.rms_unit(x, eps_tensor)), weight
    weight = weight.clone()
    if bias is None:
        return (lambda x: kernels.rms_norm(x, weight, eps)), None
    bias = bias.clone()
    return (lambda x: kernels.layer_norm(x, weight, bias, eps)), None
