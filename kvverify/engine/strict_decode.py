"""One decoded token through a whole model in strict numerics, bit for bit what the model's modules compute.

The module path (:meth:`kvverify.reference.model.ReferenceModel.forward`) spends most of a one-token step on
Python: module calls, a step context, a mask per layer, the checks that find which keys each query sees. A
decode step of an unpadded batch without ALiBi needs none of it: its one query sees every key the cache returns
(the newest ``sliding_window`` of them with a window). :class:`StrictDecodeStep` runs the same strict kernels
(:mod:`kvverify.reference.numerics`) from flat per-layer tuples, with the projections that read one input
fused into one call (each output is its own tree over the input, so fusing changes no bit) and the weights
cast to the compute dtype once. ``tests/test_strict_decode.py`` checks it against the model bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvverify.engine.decode import decode_keys
from kvverify.protocol.cache import KVCache
from kvverify.protocol.config import ModelConfig
from kvverify.reference import numerics
from kvverify.reference.inputs import check_cache_output
from kvverify.reference.weights import ModelWeights, NormWeights


class _Layer(NamedTuple):
    """One block's weights, in the compute dtype where a projection reads them."""

    layer_idx: int
    attn_norm: NormWeights
    qkv: torch.Tensor  # (n_heads * D + 2 * n_kv_heads * D, d_model)
    wo: torch.Tensor  # (d_model, n_heads * D)
    mlp_norm: NormWeights
    gate_up: torch.Tensor  # (2 * d_ff, d_model)
    down: torch.Tensor  # (d_model, d_ff)


def supports(config: ModelConfig) -> bool:
    """Whether a model of this configuration can decode with :class:`StrictDecodeStep` (when unpadded)."""
    return config.numerics == "strict" and config.positional != "alibi"


class StrictDecodeStep:
    """``step(tokens (B, 1), cache, start) -> logits (B, vocab)`` for a token at slot ``start`` of every row,
    without padding: bit for bit ``model(tokens, cache=cache, start=start)[:, -1]`` for a model that
    :func:`supports` it, for ``start < max_len`` (default: the model's ``max_seq_len``). It copies ``weights``
    when built and reads nothing of the model after."""

    def __init__(self, weights: ModelWeights, max_len: int | None = None) -> None:
        c = weights.config
        if not supports(c):
            raise ValueError(
                f"StrictDecodeStep needs strict numerics without ALiBi; got numerics={c.numerics!r}, "
                f"positional={c.positional!r}. Use the model itself for this configuration."
            )
        self.config = c
        self.max_len = c.max_seq_len if max_len is None else min(max_len, c.max_seq_len)
        compute = numerics.compute_dtype(c.dtype)

        def fused(*parts: torch.Tensor) -> torch.Tensor:  # (sum of d_out, d_in): one call, the same bits
            return _own(torch.cat(parts), compute)

        self.layers = tuple(
            _Layer(i, _copy(w.attn_norm), fused(w.wq, w.wk, w.wv), _own(w.wo, compute), _copy(w.mlp_norm),
                   fused(w.w_gate, w.w_up), _own(w.w_down, compute))
            for i, w in enumerate(weights.layers)
        )
        self.final_norm = _copy(weights.final_norm)
        self.lm_head = _own(weights.lm_head, compute)  # (vocab, d_model)
        # layers, final_norm and lm_head: this step's own copies, which NativeStep reads too (never written)
        self._embeddings = weights.tok_embeddings.clone()  # (vocab, d_model)
        positions = weights.pos_embeddings
        self._positions = None if positions is None else positions[: self.max_len].clone()  # (max_len, d_model)
        self._slots = torch.arange(self.max_len, device=self._embeddings.device)  # cache_position of each slot
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: (max_seq_len, D), as the model's
        if c.positional == "rope":
            every = torch.arange(c.max_seq_len, device=self._embeddings.device)[None]
            cos, sin = numerics.rope_tables(every, c.head_dim, c.rope_theta, c.dtype)
            self._rope = cos[0, 0], sin[0, 0]

        from kvverify.engine.native_step import NativeStep  # the native kernels' driver, where they apply

        self._native = NativeStep(self) if NativeStep.supports(c) else None

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        if self._native is not None and self._native.takes(tokens):
            return self._native(tokens, cache, start)
        return self.layers_from(self.embed(tokens, start), cache, start, 0)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (B, 1) -> x (B, 1, d_model): the token's embedding, and its position's where learned."""
        x = self._embeddings[tokens]  # (B, 1, d_model)
        return x if self._positions is None else x + self._positions[start]

    def rope_at(self, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin (D,) each at slot ``start``, or None without RoPE."""
        return None if self._rope is None else (self._rope[0][start], self._rope[1][start])

    def layers_from(self, x: torch.Tensor, cache: KVCache, start: int, first: int) -> torch.Tensor:
        """Layers ``first`` onwards from x (B, 1, d_model), then the logits (B, vocab)."""
        rope = self.rope_at(start)
        for layer in self.layers[first:]:
            q, k, v = self.project(x, layer, rope)
            keys, values = self.cached(cache, k, v, layer.layer_idx, start)
            x = self.attend(x, q, keys, values, layer)
        return self.logits(x)

    def project(self, x: torch.Tensor, layer: _Layer,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention norm and q, k, v: (B, H, 1, D), (B, Hkv, 1, D), (B, Hkv, 1, D), RoPE applied."""
        c = self.config
        batch, n_q, n_kv, head_dim = x.shape[0], c.n_heads, c.n_kv_heads, c.head_dim
        q_width, kv_width = n_q * head_dim, n_kv * head_dim
        qkv = numerics.linear(_norm(x, layer.attn_norm, c.norm_eps), layer.qkv)  # (B, 1, (H + 2 Hkv) D)
        qk = qkv[..., : q_width + kv_width].reshape(batch, n_q + n_kv, 1, head_dim)  # one token, heads as rows
        if rope is not None:  # before caching: the cache holds rotated keys (elementwise: q and k at once)
            qk = numerics.apply_rope(qk, *rope)
        v = qkv[..., q_width + kv_width :].reshape(batch, n_kv, 1, head_dim).contiguous()
        return qk[:, :n_q], qk[:, n_q:].contiguous(), v

    def cached(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, 1, D) through the cache at slot ``start`` -> the keys and values (B, Hkv, S', D) the
        query sees."""
        result = cache.update(k, v, layer_idx, {"cache_position": self._slots[start : start + 1]})
        check_cache_output(self.config, result, layer_idx)
        return decode_keys(result[0], result[1], start + 1, self.config.sliding_window)

    def attend(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               layer: _Layer) -> torch.Tensor:
        """x (B, 1, d_model) after the block's attention to keys and values (B, Hkv, S', D) and its MLP."""
        c = self.config
        batch = x.shape[0]
        out = numerics.attention_to_every_key(q, keys, values)  # (B, H, 1, D)
        x = x + numerics.linear(out.reshape(batch, 1, c.n_heads * c.head_dim), layer.wo)
        gate_up = numerics.linear(_norm(x, layer.mlp_norm, c.norm_eps), layer.gate_up)  # (B, 1, 2 d_ff)
        d_ff = gate_up.shape[-1] // 2
        gate = numerics.lane_stable(F.silu, gate_up[..., :d_ff])
        return x + numerics.linear(gate * gate_up[..., d_ff:], layer.down)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, d_model) -> logits (B, vocab)."""
        return numerics.linear(_norm(x, self.final_norm, self.config.norm_eps), self.lm_head)[:, -1]


def _own(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy in ``dtype`` (the native step reads the memory row by row)."""
    return weight.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _copy(norm: NormWeights) -> NormWeights:
    bias = None if norm.bias is None else _own(norm.bias, norm.bias.dtype)
    return NormWeights(_own(norm.weight, norm.weight.dtype), bias)


def _norm(x: torch.Tensor, norm: NormWeights, eps: float) -> torch.Tensor:
    if norm.bias is None:
        return numerics.rms_norm(x, norm.weight, eps)
    return numerics.layer_norm(x, norm.weight, norm.bias, eps)
