"""One decoded token through the whole reference model in one function, for fast numerics.

The module path (:meth:`kvverify.reference.model.ReferenceModel.forward`) spends most of a one-token step on Python:
module calls, a :class:`~kvverify.reference.model.StepContext`, weight checks in every layer. :class:`DecodeStep` runs
the same kernels on the same packed weights from flat per-layer tuples (as gpt-fast's ``decode_one_token``),
checking the weights once per call (once per ``generate``, which drives :meth:`DecodeStep.decode` itself),
with each residual add fused into the projection before it (``addmm_``).
It covers the simple case only: fast numerics, one new token per row, no padding, no ALiBi, so every key the
cache returns is visible (the newest ``sliding_window`` of them with a window). The model runs everything else
through its modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import nn

from kvverify.protocol import KVCache, written_slots
from kvverify.reference import numerics
from kvverify.reference.config import ModelConfig

if TYPE_CHECKING:
    from kvverify.reference.model import Block, Norm, ReferenceModel

NormFn = Callable[[torch.Tensor], torch.Tensor]


class _Layer(NamedTuple):
    """One block's weights, as the module path uses them (the packed ones are shared, not copied)."""

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


class DecodeStep:
    """``step(tokens (B, 1), cache, start) -> logits (B, vocab)`` for a token at slot ``start`` of every row,
    without padding, equal to ``model(tokens, cache=cache, start=start)[:, -1]`` for a model that
    :func:`supports` it, up to the rounding of a fused residual add (``addmm``). Each call first reads the
    weights again if a parameter of the model was replaced or modified in place (:meth:`refresh`, the check of
    :class:`~kvverify.reference.model._PackedWeight` once for the whole model); :meth:`decode` skips that check."""

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
        # The parameters of every module the step reads (live dicts: a replaced parameter shows up); a step
        # compares their (pointer, version) pairs.
        watched = (model, model.final_norm, *model.layers.modules())
        self._parameter_dicts = tuple(m._parameters for m in watched)
        self._key: list[tuple[int, int]] = []
        self._sources: tuple[torch.Tensor, ...] = ()  # kept alive so a freed pointer is never reused unseen
        self._layers: tuple[_Layer, ...] = ()
        self._final_norm: NormFn = _identity
        self._embeddings = self._lm_head = torch.empty(0)  # (vocab, d_model), (d_model, vocab)
        self._positions: torch.Tensor | None = None  # learned: (max_seq_len, d_model)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, signed sin: (max_seq_len, D)
        self._slots = torch.empty(0, dtype=torch.long)  # (max_seq_len,): 0, 1, 2... for cache_position

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        self.refresh()
        return self.decode(tokens, cache, start)

    def decode(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """The step with the weights as last read by :meth:`refresh`: for a caller that knows no parameter has
        changed since (``ReferenceModel.generate`` refreshes once per call)."""
        # On a CPU a decoded token is the weights' memory traffic plus a fixed cost per kernel call, and that cost
        # grows several-fold right after a projection has streamed its weight through the caches. Hence one fused
        # call where two would do (addmm_ for the residual, norm weights folded into the projections) and lookups
        # instead of per-step tensors (slots, RoPE rows).
        n_q, n_kv, head_dim, window = self._n_q, self._n_kv, self._head_dim, self._window
        batch = tokens.shape[0]
        total = start + 1  # N: tokens in the cache after this step
        cache_kwargs = {"cache_position": self._slots[start:total]}  # (1,)
        x = self._embeddings.index_select(0, tokens.view(batch))  # (B, d_model), a new tensor: updated in place
        if self._positions is not None:
            x = x + self._positions[start]
        rope = self._rope
        if rope is not None:
            cos, sin = rope[0][start], rope[1][start]  # (D,)
        qkv_shape = (batch, n_q + 2 * n_kv, 1, head_dim)
        rows_shape = (batch, n_kv, n_q // n_kv, head_dim)  # a KV head's queries as rows (dense_attention)
        scale = 1.0 / math.sqrt(head_dim)  # as numerics.dense_attention
        mm, sdpa, silu = torch.mm, nn.functional.scaled_dot_product_attention, nn.functional.silu
        for layer_idx, attn_norm, w_qkv, w_o, mlp_norm, w_gate_up, w_down in self._layers:
            qkv = mm(attn_norm(x), w_qkv).view(qkv_shape)  # (B, H + 2 Hkv, 1, D)
            qk, v = qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]  # (B, H + Hkv, 1, D), (B, Hkv, 1, D)
            if rope is not None:
                qk = numerics.fast_apply_rope(qk, cos, sin)
            k, v = cache.update(qk[:, n_q:], v, layer_idx, cache_kwargs)  # (B, Hkv, S, D)
            k, v = written_slots(k, v, total)
            s = k.shape[-2]
            if window is not None and s > window:  # the query sees the newest `window` keys only
                k, v = k[:, :, s - window :], v[:, :, s - window :]
            out = sdpa(qk[:, :n_q].reshape(rows_shape), k, v, scale=scale)  # (B, Hkv, H / Hkv, D)
            x.addmm_(out.view(batch, n_q * head_dim), w_o)
            gate_up = mm(mlp_norm(x), w_gate_up)  # (B, 2 d_ff)
            d_ff = gate_up.shape[-1] // 2
            x.addmm_(silu(gate_up[:, :d_ff]).mul_(gate_up[:, d_ff:]), w_down)
        return mm(self._final_norm(x), self._lm_head)  # (B, vocab)

    def refresh(self) -> None:
        """Read the weights again if any parameter was replaced or modified in place since the last read."""
        key = [(p.data_ptr(), p._version) for d in self._parameter_dicts for p in d.values() if p is not None]
        if key != self._key:
            self._build()
            self._key = key

    def _build(self) -> None:
        model = self.model
        self._sources = tuple(p.detach() for p in model.parameters())
        self._embeddings = model.tok_embeddings.detach()
        probe = self._embeddings[:0]  # (0, d_model): an activation's dtype and device, which pick the norms
        layers = []
        for i, module in enumerate(model.layers):
            block = cast("Block", module)
            attn, mlp = block.attn, block.mlp
            attn_scale, mlp_scale = _folded(block.attn_norm, probe), _folded(block.mlp_norm, probe)
            layers.append(
                _Layer(
                    layer_idx=i,
                    attn_norm=_norm_fn(block.attn_norm, probe),
                    qkv=attn._qkv.get(attn.wq, attn.wk, attn.wv, in_scale=attn_scale),
                    wo=attn._wo.get(attn.wo),
                    mlp_norm=_norm_fn(block.mlp_norm, probe),
                    gate_up=mlp._gate_up.get(mlp.w_gate, mlp.w_up, in_scale=mlp_scale),
                    down=mlp._down.get(mlp.w_down),
                )
            )
        self._layers = tuple(layers)
        self._final_norm = _norm_fn(model.final_norm, probe)
        self._lm_head = model._lm_head.get(model.lm_head, in_scale=_folded(model.final_norm, probe))
        self._positions = None if model.pos_embeddings is None else model.pos_embeddings.detach()
        self._rope = None
        if model.config.positional == "rope":
            cos, sin = model._rope_table.span(0, model.config.max_seq_len, self._embeddings.device)
            self._rope = cos[0, 0], sin[0, 0]
        self._slots = torch.arange(model.config.max_seq_len, device=self._embeddings.device)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _folded(norm: Norm, probe: torch.Tensor) -> torch.Tensor | None:
    """The weight ``norm`` folds into the next projection for activations like ``probe``, or None."""
    return norm.weight if norm.folds(probe) else None


def _norm_fn(norm: Norm, probe: torch.Tensor) -> NormFn:
    """``norm`` as the module path applies it to activations like ``probe``: without the weight where
    :meth:`~kvverify.reference.model.Norm.folds` (the projection holds it), else whole."""
    return norm.unit if norm.folds(probe) else norm.forward
