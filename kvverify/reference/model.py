"""A readable decoder-only transformer with a cached and an uncached generation path.

Pre-norm blocks (RMSNorm or LayerNorm), grouped-query attention with RoPE, learned, ALiBi or no positions,
an optional sliding window, a SwiGLU MLP and an untied LM head: the shape of Llama and Mistral. The slots,
positions and masks of a forward are in :mod:`kvverify.reference.context`; the arithmetic is the model's
kernel set (:mod:`kvverify.reference.kernels`), strict or fast, chosen once from ``config.numerics``.
``generate`` has one cached and one uncached path; a caller may hand it a decode step of its own for
single-token steps (:func:`kvverify.engine.generation.generate` passes the engine's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from kvverify.protocol.cache import KVCache, written_slots
from kvverify.protocol.config import ModelConfig
from kvverify.reference import kernels, numerics
from kvverify.reference.context import StepContext
from kvverify.reference.default_cache import ReferenceCache
from kvverify.reference.inputs import check_cache_output, check_cache_start, check_generate_inputs
from kvverify.reference.weights import LayerWeights, ModelWeights, NormWeights

#: A decode step run by someone other than the model: (token (B, 1), cache holding ``past`` tokens, past) ->
#: the logits (B, vocab) of that one token, after writing it to the cache; None leaves the step to the model.
DecodeStepFn = Callable[[torch.Tensor, KVCache, int], "torch.Tensor | None"]


@dataclass(frozen=True)
class Generation:
    """The result of :meth:`ReferenceModel.generate`.

    tokens: (B, N) the generated tokens; logits: (B, N, vocab) the logits that chose each token;
    sequences: (B, T + N) prompt and tokens; attention_mask: (B, T + N) with ones for the generated tokens;
    cache: the cache after generation (None when ``use_cache=False``). It holds every token but the last
    generated one: pass ``sequences`` and ``attention_mask`` back with it to continue.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    cache: KVCache | None


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx, self.ops = config, layer_idx, kernels.for_config(config)
        c = config
        self.wq = _param(c.n_heads * c.head_dim, c.d_model)
        self.wk = _param(c.n_kv_heads * c.head_dim, c.d_model)
        self.wv = _param(c.n_kv_heads * c.head_dim, c.d_model)
        self.wo = _param(c.d_model, c.n_heads * c.head_dim)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None) -> torch.Tensor:
        c, ops = self.config, self.ops
        batch, t, _ = x.shape
        q = ops.linear(x, self.wq).view(batch, t, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = ops.linear(x, self.wk).view(batch, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = ops.linear(x, self.wv).view(batch, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if ctx.rope is not None:  # RoPE before caching: the cache holds rotated keys
            q, k = ops.apply_rope(q, *ctx.rope), ops.apply_rope(k, *ctx.rope)
        if cache is not None:
            result = cache.update(k, v, self.layer_idx, {"cache_position": ctx.cache_position})
            check_cache_output(c, result, self.layer_idx)
            k, v = result
        k, v = written_slots(k, v, ctx.total)  # (B, Hkv, S', D): slots total - S' .. total - 1
        out = ops.attention(q, k, v, ctx.mask(k.shape[-2]))  # (B, H, T, D)
        return ops.linear(out.transpose(1, 2).reshape(batch, t, -1), self.wo)  # (B, T, d_model)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ops = kernels.for_config(config)
        self.w_gate = _param(config.d_ff, config.d_model)
        self.w_up = _param(config.d_ff, config.d_model)
        self.w_down = _param(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        gate = ops.silu(ops.linear(x, self.w_gate))  # (..., d_ff)
        return ops.linear(gate * ops.linear(x, self.w_up), self.w_down)  # (..., d_model)


class Norm(nn.Module):
    """RMSNorm, or LayerNorm (with a bias) when ``config.norm == "layer"``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps, self.ops = config.norm_eps, kernels.for_config(config)
        self.weight = _param(config.d_model)
        self.bias = _param(config.d_model) if config.norm == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def weights(self) -> NormWeights:
        return NormWeights(self.weight.detach(), None if self.bias is None else self.bias.detach())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = Norm(config), Attention(config, layer_idx)
        self.mlp_norm, self.mlp = Norm(config), MLP(config)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        x = x + self.mlp(self.mlp_norm(x))
        return x

    def weights(self) -> LayerWeights:
        attn, mlp = self.attn, self.mlp
        return LayerWeights(
            attn_norm=self.attn_norm.weights(),
            wq=attn.wq.detach(), wk=attn.wk.detach(), wv=attn.wv.detach(), wo=attn.wo.detach(),
            mlp_norm=self.mlp_norm.weights(),
            w_gate=mlp.w_gate.detach(), w_up=mlp.w_up.detach(), w_down=mlp.w_down.detach(),
        )  # fmt: skip


class ReferenceModel(nn.Module):
    """The reference decoder. Weights are drawn from ``seed`` in float64 on the CPU and then cast, so one seed
    gives the same model (up to rounding) in every dtype and on every device."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config, self.ops = config, kernels.for_config(config)
        self.tok_embeddings = _param(config.vocab_size, config.d_model)
        self.pos_embeddings = _param(config.max_seq_len, config.d_model) if config.positional == "learned" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = Norm(config)
        self.lm_head = _param(config.vocab_size, config.d_model)
        slopes = numerics.alibi_slopes(config.n_heads) if config.positional == "alibi" else None
        self.alibi_slopes = slopes.to(config.dtype).to(config.device) if slopes is not None else None
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: (max_seq_len, D) each
        if config.positional == "rope":
            every = torch.arange(config.max_seq_len, device=config.device)[None]  # (1, max_seq_len)
            cos, sin = self.ops.rope_tables(every, config.head_dim, config.rope_theta, config.dtype)
            self.rope_tables = cos[0, 0], sin[0, 0]
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            shape = param.shape
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
            elif name.endswith("norm.bias"):
                value = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
            elif name in ("tok_embeddings", "pos_embeddings"):
                value = torch.randn(shape, generator=generator, dtype=torch.float64)
            else:  # (d_out, d_in): unit-variance outputs, so logits spread and greedy choices are rarely ties
                value = torch.randn(shape, generator=generator, dtype=torch.float64) / shape[-1] ** 0.5
            param.data = value.to(dtype=self.config.dtype, device=self.config.device)

    def weights(self) -> ModelWeights:
        """Every weight as it is now, as plain tensors (the parameters' own storage, detached)."""
        return ModelWeights(
            config=self.config,
            tok_embeddings=self.tok_embeddings.detach(),
            pos_embeddings=None if self.pos_embeddings is None else self.pos_embeddings.detach(),
            layers=tuple(cast("Block", block).weights() for block in self.layers),
            final_norm=self.final_norm.weights(),
            lm_head=self.lm_head.detach(),
        )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        cache: KVCache | None = None,
        start: int = 0,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for new tokens at slots ``start .. start+T-1``.

        tokens: (B, T) long; attention_mask: (B, start+T), 1 for tokens and 0 for (left) padding, over every
        slot so far (None: no padding). Without a cache, ``start`` must be 0. Returns (B, T, vocab), or
        (B, 1, vocab) with ``last_only``. A cache must hold exactly ``start`` tokens, for a model of this config.
        """
        if cache is not None:
            check_cache_start(self.config, cache, start)
        ctx = StepContext.build(
            tokens, start, attention_mask,
            rope_tables=self.rope_tables,
            alibi_slopes=self.alibi_slopes, window=self.config.sliding_window,
        )  # fmt: skip
        x = self.tok_embeddings[tokens]  # (B, T, d_model)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings[ctx.position_ids[:, start:]]
        for layer in self.layers:
            x = layer(x, ctx, cache)
        if last_only:
            x = x[:, -1:]
        return self.ops.linear(self.final_norm(x), self.lm_head)  # (B, T or 1, vocab)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        decode_step: DecodeStepFn | None = None,
    ) -> Generation:
        """Greedy generation.

        prompt: (B, T) long, left-padded where ``attention_mask`` (B, T) has zeros. ``use_cache=False``
        recomputes the whole prefix for every token, exactly ``x[1:t+1] = LLM(x[1:t])``. ``use_cache=True``
        prefills ``cache`` (a new :class:`~kvverify.reference.default_cache.ReferenceCache` when None) with the
        tokens it does not hold yet and then feeds one token per step. A non-empty cache must hold a prefix of
        ``prompt``. ``decode_step``, when given, runs the single-token steps of an unpadded cached generation
        (where it returns None, the model runs the step).
        """
        mask = check_generate_inputs(self.config, prompt, max_new_tokens, attention_mask, use_cache, cache)
        unpadded = bool(mask.all())  # generated tokens never add padding: no mask needed at all
        sequences = prompt  # grown every step only where a step needs it (uncached); else joined at the end
        chosen_tokens: list[torch.Tensor] = []
        chosen_logits: list[torch.Tensor] = []
        if use_cache:
            cache = ReferenceCache() if cache is None else cache
            past = int(cache.get_seq_length())  # transformers' static caches return a 0-d tensor
            new = prompt[:, past:]
        stepper = decode_step if use_cache and unpadded else None
        for _ in range(max_new_tokens):
            stepped = None
            if stepper is not None and cache is not None and new.shape[1] == 1:
                stepped = stepper(new, cache, past)  # (B, vocab), or None
            if stepped is not None:
                last, past = stepped, past + 1
            elif use_cache:
                logits = self(new, cache=cache, start=past, attention_mask=None if unpadded else mask, last_only=True)
                last, past = logits[:, -1], past + new.shape[1]
            else:
                last = self(sequences, attention_mask=None if unpadded else mask, last_only=True)[:, -1]
            new = last.argmax(-1, keepdim=True)  # (B, 1): the chosen token, the next step's input
            chosen_tokens.append(new)
            chosen_logits.append(last)
            if not use_cache:
                sequences = torch.cat((sequences, new), dim=1)
            if not unpadded:  # a padded step reads the mask of every slot so far
                mask = torch.cat((mask, torch.ones_like(new)), dim=1)
        tokens = torch.cat(chosen_tokens, dim=1)  # (B, N)
        if use_cache:
            sequences = torch.cat((prompt, tokens), dim=1)
        if unpadded:
            mask = torch.cat((mask, torch.ones_like(tokens)), dim=1)
        return Generation(
            tokens=tokens,
            logits=torch.stack(chosen_logits, dim=1),
            sequences=sequences,
            attention_mask=mask,
            cache=cache if use_cache else None,
        )
