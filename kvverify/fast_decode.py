"""One decoded token through the whole reference model in one function, for fast numerics.

The module path (:meth:`kvverify.model.ReferenceModel.forward`) spends most of a one-token step on Python:
module calls, a :class:`~kvverify.model.StepContext`, weight checks in every layer. :class:`DecodeStep` runs
the same kernels on the same packed weights from flat per-layer tuples (as gpt-fast's ``decode_one_token``),
checking the weights once per step. It covers the simple case only: fast numerics, one new token per row, no
padding, no ALiBi, so every key the cache returns is visible (the newest ``sliding_window`` of them with a
window). The model runs everything else through its modules.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import nn

from kvverify import numerics
from kvverify.config import ModelConfig
from kvverify.protocol import KVCache

if TYPE_CHECKING:
    from kvverify.model import Block, Norm, ReferenceModel

NormFn = Callable[[torch.Tensor], torch.Tensor]


class _Layer(NamedTuple):
    """One block's weights, as the module path uses them (the packed ones are shared, not copied)."""

    layer_idx: int
    attn_norm: NormFn
    qkv: torch.Tensor  # (d_model, (H + 2 Hkv) * D)
    wo: torch.Tensor  # (H * D, d_model)
    mlp_norm: NormFn
    gate_up: torch.Tensor  # (d_model, 2 d_ff)
    down: torch.Tensor  # (d_ff, d_model)


def supports(config: ModelConfig) -> bool:
    """Whether a model of this configuration can decode with :class:`DecodeStep` (when unpadded)."""
    return config.numerics == "fast" and config.positional != "alibi"


class DecodeStep:
    """``step(tokens (B, 1), cache, start) -> logits (B, vocab)`` for a token at slot ``start`` of every row,
    without padding, equal to ``model(tokens, cache=cache, start=start)[:, -1]`` for a model that
    :func:`supports` it. Weights are read again whenever a parameter of the model is replaced or modified in
    place (the check of :class:`~kvverify.model._PackedWeight`, once per step for the whole model)."""

    def __init__(self, model: ReferenceModel) -> None:
        if not supports(model.config):
            raise ValueError(
                f"DecodeStep needs fast numerics without ALiBi; got numerics={model.config.numerics!r}, "
                f"positional={model.config.positional!r}. Use the model itself for this configuration."
            )
        self.model = model
        c = model.config
        self._n_q, self._n_kv, self._head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self._window = c.sliding_window
        # Every module whose parameters the step reads; a step compares their (pointer, version) pairs.
        self._watched: tuple[nn.Module, ...] = (model, model.final_norm, *model.layers.modules())
        self._key: tuple[tuple[int, int], ...] = ()
        self._sources: tuple[torch.Tensor, ...] = ()  # kept alive so a freed pointer is never reused unseen
        self._layers: tuple[_Layer, ...] = ()
        self._final_norm: NormFn = _identity
        self._embeddings = self._lm_head = torch.empty(0)  # (vocab, d_model), (d_model, vocab)
        self._positions: torch.Tensor | None = None  # learned: (max_seq_len, d_model)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, signed sin: (max_seq_len, D)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        self._refresh()
        n_q, n_kv, head_dim, window = self._n_q, self._n_kv, self._head_dim, self._window
        batch = tokens.shape[0]
        total = start + 1  # N: tokens in the cache after this step
        cache_kwargs = {"cache_position": torch.arange(start, total, device=tokens.device)}  # (1,)
        x = self._embeddings[tokens.view(batch)]  # (B, d_model)
        if self._positions is not None:
            x = x + self._positions[start]
        if self._rope is not None:
            cos, sin = self._rope[0][start], self._rope[1][start]  # (D,)
        for layer in self._layers:
            qkv = torch.mm(layer.attn_norm(x), layer.qkv).view(batch, n_q + 2 * n_kv, 1, head_dim)
            qk, v = qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]  # (B, H + Hkv, 1, D), (B, Hkv, 1, D)
            if self._rope is not None:
                qk = numerics.fast_apply_rope(qk, cos, sin)
            q, k = qk[:, :n_q], qk[:, n_q:]  # (B, H, 1, D), (B, Hkv, 1, D)
            k, v = cache.update(k, v, layer.layer_idx, cache_kwargs)  # (B, Hkv, S, D)
            s = k.shape[-2]
            if s > total:  # a preallocated buffer: slots N.. are unwritten
                k, v, s = k[:, :, :total], v[:, :, :total], total
            if window is not None and s > window:  # the query sees the newest `window` keys only
                k, v = k[:, :, s - window :], v[:, :, s - window :]
            out = numerics.dense_attention(q, k, v, causal=False)  # (B, H, 1, D)
            x = x + torch.mm(out.view(batch, n_q * head_dim), layer.wo)
            gate, up = torch.mm(layer.mlp_norm(x), layer.gate_up).chunk(2, dim=-1)  # (B, d_ff) each
            x = x + torch.mm(nn.functional.silu(gate).mul_(up), layer.down)
        return torch.mm(self._final_norm(x), self._lm_head)  # (B, vocab)

    def _refresh(self) -> None:
        watched = [p for m in self._watched for p in m._parameters.values() if p is not None]
        key = tuple([(p.data_ptr(), p._version) for p in watched])
        if key != self._key:
            self._build()
            self._key = key

    def _build(self) -> None:
        model = self.model
        self._sources = tuple(p.detach() for p in model.parameters())
        self._embeddings = model.tok_embeddings.detach()
        dtype = self._embeddings.dtype  # of every activation, which picks the norm's kernels
        layers = []
        for i, module in enumerate(model.layers):
            block = cast("Block", module)
            attn, mlp = block.attn, block.mlp
            layers.append(
                _Layer(
                    layer_idx=i,
                    attn_norm=_norm_fn(block.attn_norm, dtype),
                    qkv=attn._qkv.get(attn.wq, attn.wk, attn.wv),
                    wo=attn._wo.get(attn.wo),
                    mlp_norm=_norm_fn(block.mlp_norm, dtype),
                    gate_up=mlp._gate_up.get(mlp.w_gate, mlp.w_up),
                    down=mlp._down.get(mlp.w_down),
                )
            )
        self._layers = tuple(layers)
        self._final_norm = _norm_fn(model.final_norm, dtype)
        self._lm_head = model._lm_head.get(model.lm_head)
        self._positions = None if model.pos_embeddings is None else model.pos_embeddings.detach()
        self._rope = None
        if model.config.positional == "rope":
            cos, sin = model._rope_table.span(0, model.config.max_seq_len, self._embeddings.device)
            self._rope = cos[0, 0], sin[0, 0]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _norm_fn(norm: Norm, dtype: torch.dtype) -> NormFn:
    """``norm.forward`` for inputs of ``dtype``, with its branch taken once."""
    weight = norm.weight.detach()
    bias = None if norm.bias is None else norm.bias.detach()
    if norm.fast and dtype in (torch.float32, torch.float64):
        if bias is None:
            eps = torch.tensor(norm.eps, dtype=dtype, device=weight.device)
            return partial(numerics.fast_rms_norm, weight=weight, eps=eps)
        return partial(numerics.fast_layer_norm, weight=weight, bias=bias, eps=norm.eps)
    if bias is None:
        return partial(numerics.rms_norm, weight=weight, eps=norm.eps, strict=norm.strict)
    return partial(numerics.layer_norm, weight=weight, bias=bias, eps=norm.eps, strict=norm.strict)
