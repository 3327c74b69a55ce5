"""A readable decoder-only transformer with a cached and an uncached generation path.

Pre-norm blocks (RMSNorm or LayerNorm), grouped-query attention with RoPE, learned, ALiBi or no positions,
an optional sliding window, a SwiGLU MLP and an untied LM head: the shape of Llama and Mistral.

Geometry. Tokens are numbered by *slot*: slot 0 is the first token the cache ever saw, left padding
included. A forward over new tokens at slots ``start .. start+T-1`` sees keys for slots ``0 .. N-1``
(``N = start + T``). Query slot ``i`` may attend to key slot ``j`` when ``j <= i`` (causal, aligned to the
bottom right, unlike ``is_causal=True`` which aligns top left), ``i - j < W`` with a sliding window of W,
and key ``j`` is not padding. A padding query attends to itself only, so no row is empty.
*Positions* (for RoPE, learned embeddings and ALiBi) are ``cumsum(attention_mask) - 1``: left padding does
not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from kvverify.caches import ContiguousCache
from kvverify.engine import decode
from kvverify.protocol import KVCache, written_slots
from kvverify.reference import numerics
from kvverify.reference.config import ModelConfig
from kvverify.reference.inputs import check_generate_inputs
from kvverify.reference.weights import LayerWeights, ModelWeights, NormWeights


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


@dataclass(frozen=True)
class StepContext:
    """Everything a layer needs about the tokens of one forward, shared by all layers."""

    start: int  # slot of the first new token
    total: int  # N: tokens written after this forward
    key_is_token: torch.Tensor  # (B, N) bool, False for padding
    position_ids: torch.Tensor  # (B, N) long
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: (B or 1, 1, T, head_dim)
    alibi_slopes: torch.Tensor | None  # (H,)
    cache_position: torch.Tensor  # (T,) long: slots start .. total-1
    dense: bool  # no padding and no ALiBi: the mask is geometry alone (used by fast numerics)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class _PackedWeight:
    """Weights for fast numerics, concatenated along d_out (QKV, gate-up: one matmul) and stored transposed,
    (d_in, sum of d_out): ``x @ packed`` reads the weight row by row, the faster layout on CPU for few rows.
    With ``in_scale`` (d_in,), the weight of the RMSNorm before the projection, each input column is scaled
    by it: ``(x * g) @ W.T == x @ (W * g).T``, which saves the norm one multiplication per call.

    Rebuilt when a source is replaced (``param.data = ...``, ``.to()``) or modified in place (its version
    counter moves); the sources are kept alive so a freed pointer is never mistaken for the same weight.
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] = ()
        self._sources: tuple[torch.Tensor, ...] = ()
        self._value: torch.Tensor | None = None

    def get(self, *weights: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        sources = weights if in_scale is None else (*weights, in_scale)
        key = tuple([(w.data_ptr(), w._version) for w in sources])
        if self._value is None or key != self._key:
            self._sources = tuple(w.detach() for w in sources)
            packed = torch.cat(self._sources[: len(weights)])  # (sum of d_out, d_in)
            if in_scale is not None:
                packed = packed * self._sources[-1]
            self._value = packed.t().contiguous()  # (d_in, sum of d_out)
            self._key = key
        return self._value


class _RopeTable:
    """cos and signed sin (see :func:`numerics.fast_rope_tables`) for every position, built once, so fast
    numerics gathers a step's rows instead of recomputing them."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def lookup(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) -> cos, signed sin: (B, 1, T, head_dim)."""
        cos_table, sin_table = self._on(position_ids.device)
        return cos_table[position_ids][:, None], sin_table[position_ids][:, None]

    def span(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``start .. end-1`` for every row, as views -> cos, signed sin: (1, 1, T, head_dim)."""
        cos_table, sin_table = self._on(device)
        return cos_table[None, None, start:end], sin_table[None, None, start:end]

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if self._tables is None or self._tables[0].device != device:
            every = torch.arange(c.max_seq_len, device=device)[None]  # (1, max_seq_len)
            cos, sin = numerics.rope_tables(every, c.head_dim, c.rope_theta, c.dtype, False)
            cos, sin = numerics.fast_rope_tables(cos, sin)
            self._tables = cos[0, 0], sin[0, 0]  # (max_seq_len, head_dim)
        return self._tables


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        c = config
        self.wq = _param(c.n_heads * c.head_dim, c.d_model)
        self.wk = _param(c.n_kv_heads * c.head_dim, c.d_model)
        self.wv = _param(c.n_kv_heads * c.head_dim, c.d_model)
        self.wo = _param(c.d_model, c.n_heads * c.head_dim)
        self._qkv, self._wo = _PackedWeight(), _PackedWeight()

    def forward(
        self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None, in_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``in_scale``: the folded RMSNorm weight (fast numerics only, see :class:`_PackedWeight`)."""
        if self.config.numerics == "fast":
            return self._forward_fast(x, ctx, cache, in_scale)
        c, strict = self.config, self.config.numerics == "strict"
        batch, t, _ = x.shape
        q = numerics.linear(x, self.wq, strict).view(batch, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = numerics.linear(x, self.wk, strict).view(batch, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = numerics.linear(x, self.wv, strict).view(batch, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if ctx.rope is not None:  # RoPE before caching: the cache holds rotated keys
            q, k = numerics.apply_rope(q, *ctx.rope), numerics.apply_rope(k, *ctx.rope)
        if cache is not None:
            cache_position = torch.arange(ctx.start, ctx.total, device=x.device)
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
        k, v = written_slots(k, v, ctx.total)
        key_slots = torch.arange(ctx.total - k.shape[-2], ctx.total, device=k.device)  # token slot of each key
        visible, bias = self._mask(ctx, key_slots)
        out = numerics.attention(q, k, v, visible, bias, strict)  # (B, H, T, D)
        return numerics.linear(out.transpose(1, 2).reshape(batch, t, -1), self.wo, strict)

    def _forward_fast(
        self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None, in_scale: torch.Tensor | None
    ) -> torch.Tensor:
        """The same attention with one QKV matmul, RoPE on queries and keys at once, and no mask tensor when
        every key is visible (one decoded token) or the mask is the square causal one (a prefill)."""
        c = self.config
        batch, t, _ = x.shape
        n_q, n_kv = c.n_heads, c.n_kv_heads
        qkv = numerics.fast_linear(x, self._qkv.get(self.wq, self.wk, self.wv, in_scale=in_scale))
        qkv = qkv.view(batch, t, n_q + 2 * n_kv, c.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        qk, v = qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]
        if ctx.rope is not None:
            qk = numerics.fast_apply_rope(qk, *ctx.rope)
        q, k = qk[:, :n_q], qk[:, n_q:]  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": ctx.cache_position})
        k, v = written_slots(k, v, ctx.total)
        s, window = k.shape[-2], c.sliding_window
        if ctx.dense and (t == 1 or t == s) and (window is None or s <= window):
            out = numerics.dense_attention(q, k, v, causal=t > 1)  # (B, H, T, D)
        else:
            key_slots = torch.arange(ctx.total - s, ctx.total, device=k.device)
            visible, bias = self._mask(ctx, key_slots)
            out = numerics.attention(q, k, v, visible, bias, False)
        return numerics.fast_linear(out.transpose(1, 2).reshape(batch, t, -1), self._wo.get(self.wo))

    def _mask(self, ctx: StepContext, key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """visible: (B, 1, T, S') bool; bias: (B, H, T, S') for ALiBi, else None."""
        query_slots = torch.arange(ctx.start, ctx.total, device=key_slots.device)
        distance = query_slots[:, None] - key_slots[None, :]  # (T, S')
        visible = distance >= 0
        if self.config.sliding_window is not None:
            visible &= distance < self.config.sliding_window
        key_is_token = ctx.key_is_token[:, key_slots]  # (B, S')
        visible = visible[None] & key_is_token[:, None, :]
        visible |= (distance == 0)[None]  # a padding query sees itself
        bias = None
        if ctx.alibi_slopes is not None:
            q_pos = ctx.position_ids[:, ctx.start : ctx.total]  # (B, T)
            k_pos = ctx.position_ids[:, key_slots]  # (B, S')
            rel = (q_pos[:, :, None] - k_pos[:, None, :]).to(ctx.alibi_slopes.dtype)  # (B, T, S')
            bias = -ctx.alibi_slopes[None, :, None, None] * rel[:, None]
        return visible[:, None], bias


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.strict = config.numerics == "strict"
        self.w_gate = _param(config.d_ff, config.d_model)
        self.w_up = _param(config.d_ff, config.d_model)
        self.w_down = _param(config.d_model, config.d_ff)
        self._gate_up, self._down = _PackedWeight(), _PackedWeight()

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``in_scale``: the folded RMSNorm weight (fast numerics only, see :class:`_PackedWeight`)."""
        if not self.strict:  # one matmul for gate and up
            gate_up = numerics.fast_linear(x, self._gate_up.get(self.w_gate, self.w_up, in_scale=in_scale))
            gate, up = gate_up.chunk(2, dim=-1)
            return numerics.fast_linear(nn.functional.silu(gate).mul_(up), self._down.get(self.w_down))
        gate = numerics.elementwise(nn.functional.silu, numerics.linear(x, self.w_gate, self.strict), self.strict)
        return numerics.linear(gate * numerics.linear(x, self.w_up, self.strict), self.w_down, self.strict)


class Norm(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps, self.strict = config.norm_eps, config.numerics == "strict"
        self.weight = _param(config.d_model)
        self.bias = _param(config.d_model) if config.norm == "layer" else None
        self.fast = config.numerics == "fast"
        self._eps_tensor: torch.Tensor | None = None  # eps for fast_rms_norm, in the dtype and device last seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.dtype in (torch.float32, torch.float64):  # the fast kernels, same formula
            if self.bias is None:
                return numerics.fast_rms_norm(x, self.weight, self._eps_like(x))
            return numerics.fast_layer_norm(x, self.weight, self.bias, self.eps)
        if self.bias is None:
            return numerics.rms_norm(x, self.weight, self.eps, self.strict)
        return numerics.layer_norm(x, self.weight, self.bias, self.eps, self.strict)

    def folds(self, x: torch.Tensor) -> bool:
        """Whether this norm's weight moves into the next projection for ``x``: fast RMSNorm in float32 or
        float64. The caller then applies :meth:`unit` and passes ``weight`` as the projection's ``in_scale``."""
        return self.fast and self.bias is None and x.dtype in (torch.float32, torch.float64)

    def weights(self) -> NormWeights:
        return NormWeights(self.weight.detach(), None if self.bias is None else self.bias.detach())

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight, where :meth:`folds` is true."""
        return numerics.fast_rms_unit(x, self._eps_like(x))

    def before_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(normalized x, in_scale)`` for the projection that follows: ``(unit(x), weight)`` where the weight
        folds into that projection (see :class:`_PackedWeight`), else ``(norm(x), None)``."""
        if self.folds(x):
            return self.unit(x), self.weight
        return self(x), None

    def _eps_like(self, x: torch.Tensor) -> torch.Tensor:
        eps = self._eps_tensor
        if eps is None or eps.dtype != x.dtype or eps.device != x.device:
            eps = self._eps_tensor = torch.tensor(self.eps, dtype=x.dtype, device=x.device)
        return eps


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = Norm(config), Attention(config, layer_idx)
        self.mlp_norm, self.mlp = Norm(config), MLP(config)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None) -> torch.Tensor:
        h, in_scale = self.attn_norm.before_projection(x)
        x = x + self.attn(h, ctx, cache, in_scale=in_scale)
        h, in_scale = self.mlp_norm.before_projection(x)
        x = x + self.mlp(h, in_scale=in_scale)
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
        self.config = config
        self.tok_embeddings = _param(config.vocab_size, config.d_model)
        self.pos_embeddings = _param(config.max_seq_len, config.d_model) if config.positional == "learned" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = Norm(config)
        self.lm_head = _param(config.vocab_size, config.d_model)
        slopes = numerics.alibi_slopes(config.n_heads) if config.positional == "alibi" else None
        self.alibi_slopes = slopes.to(config.dtype).to(config.device) if slopes is not None else None
        self._rope_table = _RopeTable(config)
        self._lm_head = _PackedWeight()
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
        (B, 1, vocab) with ``last_only``.
        """
        c = self.config
        if c.numerics == "fast" and attention_mask is None:
            ctx = self._unpadded_context(tokens, start)
        else:
            ctx = self._context(tokens, start, attention_mask)
        x = self.tok_embeddings[tokens]  # (B, T, d_model)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings[ctx.position_ids[:, start:]]
        for layer in self.layers:
            x = layer(x, ctx, cache)
        if last_only:
            x = x[:, -1:]
        if c.numerics == "fast":
            h, in_scale = self.final_norm.before_projection(x)
            return numerics.fast_linear(h, self._lm_head.get(self.lm_head, in_scale=in_scale))
        return numerics.linear(self.final_norm(x), self.lm_head, c.numerics == "strict")

    def _context(self, tokens: torch.Tensor, start: int, attention_mask: torch.Tensor | None) -> StepContext:
        c = self.config
        batch, t = tokens.shape
        total = start + t
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=tokens.device)
        key_is_token = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, N)
        new_positions = position_ids[:, start:]
        rope = None
        if c.positional == "rope":
            if c.numerics == "fast":
                rope = self._rope_table.lookup(new_positions)
            else:
                rope = numerics.rope_tables(new_positions, c.head_dim, c.rope_theta, c.dtype, c.numerics == "strict")
        cache_position = torch.arange(start, total, device=tokens.device)
        dense = c.numerics == "fast" and self.alibi_slopes is None and bool(key_is_token.all())
        return StepContext(start, total, key_is_token, position_ids, rope, self.alibi_slopes, cache_position, dense)

    def _unpadded_context(self, tokens: torch.Tensor, start: int) -> StepContext:
        """:meth:`_context` without an attention mask, for fast numerics: positions are the slots, so RoPE
        rows are views of the table and nothing waits on a tensor's value."""
        batch, t = tokens.shape
        total = start + t
        slots = torch.arange(total, device=tokens.device)  # (N,)
        key_is_token = torch.ones(batch, total, dtype=torch.bool, device=tokens.device)
        rope = self._rope_table.span(start, total, tokens.device) if self.config.positional == "rope" else None
        dense = self.alibi_slopes is None
        return StepContext(
            start, total, key_is_token, slots.expand(batch, total), rope, self.alibi_slopes, slots[start:], dense
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Generation:
        """Greedy generation.

        prompt: (B, T) long, left-padded where ``attention_mask`` (B, T) has zeros. ``use_cache=False``
        recomputes the whole prefix for every token, exactly ``x[1:t+1] = LLM(x[1:t])``. ``use_cache=True``
        prefills ``cache`` (a new :class:`~kvverify.caches.ContiguousCache` when None) with the tokens it does
        not hold yet and then feeds one token per step. A non-empty cache must hold a prefix of ``prompt``.
        """
        mask = check_generate_inputs(self.config, prompt, max_new_tokens, attention_mask, use_cache, cache)
        unpadded = bool(mask.all())  # generated tokens never add padding: no mask needed at all
        sequences = prompt  # grown every step only where a step needs it (uncached); else joined at the end
        chosen_tokens: list[torch.Tensor] = []
        chosen_logits: list[torch.Tensor] = []
        # Fast numerics decodes one unpadded token at a time with the engine, built from the weights as they are now.
        engine = decode.DecodeStep(self.weights()) if use_cache and unpadded and decode.supports(self.config) else None
        if use_cache:
            cache = ContiguousCache() if cache is None else cache
            past = int(cache.get_seq_length())  # transformers' static caches return a 0-d tensor
            new = prompt[:, past:]
        for _ in range(max_new_tokens):
            if engine is not None and cache is not None and new.shape[1] == 1 and past < self.config.max_seq_len:
                last, past = engine(new, cache, past), past + 1  # (B, vocab)
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
