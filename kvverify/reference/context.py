"""The geometry of one forward: slots, positions and which keys each query sees.

Tokens are numbered by *slot*: slot 0 is the first token the cache ever saw, left padding included. A forward
over new tokens at slots ``start .. start+T-1`` sees keys for slots ``0 .. N-1`` (``N = start + T``). Query slot
``i`` may attend to key slot ``j`` when ``j <= i`` (causal, aligned to the bottom right, unlike
``is_causal=True`` which aligns top left), ``i - j < W`` with a sliding window of W, and key ``j`` is not
padding. A padding query attends to itself only, so no row is empty. *Positions* (for RoPE, learned
embeddings and ALiBi) are ``cumsum(attention_mask) - 1``: left padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepContext:
    """Everything a layer needs about the tokens of one forward, shared by all layers."""

    start: int  # slot of the first new token
    total: int  # N: tokens written after this forward
    key_is_token: torch.Tensor | None  # (B, N) bool, False for padding; None: no padding
    position_ids: torch.Tensor  # (B, N) long
    cache_position: torch.Tensor  # (T,) long: slots start .. total-1
    rope: tuple[torch.Tensor, torch.Tensor] | None  # RoPE rows of the new tokens: (B, 1, T, head_dim) each
    alibi_slopes: torch.Tensor | None  # (H,)
    window: int | None
    # Mask.tensors() per number of keys: every layer of a forward asks for the same ones (at 4,096 tokens,
    # 45 ms of mask per layer)
    masks: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(
        cls,
        tokens: torch.Tensor,
        start: int,
        attention_mask: torch.Tensor | None,
        *,
        rope_tables: tuple[torch.Tensor, torch.Tensor] | None,
        alibi_slopes: torch.Tensor | None,
        window: int | None,
    ) -> StepContext:
        """tokens: (B, T); attention_mask: (B, start+T) or None (no padding); rope_tables: the kernels' RoPE
        tables for every position, (max_seq_len, head_dim) each."""
        batch, t = tokens.shape
        total = start + t
        slots = torch.arange(total, device=tokens.device)  # (N,)
        key_is_token = None
        if attention_mask is None or bool(attention_mask.all()):
            position_ids = slots.expand(batch, total)
        else:
            key_is_token = attention_mask.bool()
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, N)
        rope = None
        if rope_tables is not None:
            new_positions = position_ids[:, start:]  # (B, T)
            rope = rope_tables[0][new_positions][:, None], rope_tables[1][new_positions][:, None]
        return cls(start, total, key_is_token, position_ids, slots[start:], rope, alibi_slopes, window)

    def mask(self, n_keys: int) -> Mask:
        """Which of the ``n_keys`` keys the cache returned (slots ``total - n_keys .. total - 1``) each query sees."""
        return Mask(self, n_keys)


@dataclass(frozen=True)
class Mask:
    """The visibility of S' keys (the newest, up to slot ``N - 1``) from the T queries of one forward."""

    ctx: StepContext
    n_keys: int  # S'

    @property
    def causal(self) -> bool | None:
        """Where no padding, window or ALiBi applies and the mask is all ones (one query: False) or the square
        causal one (T == S': True), so it needs no tensor; None elsewhere."""
        ctx, t, s = self.ctx, self.ctx.total - self.ctx.start, self.n_keys
        if ctx.key_is_token is not None or ctx.alibi_slopes is not None or not (t == 1 or t == s):
            return None
        if ctx.window is not None and s > ctx.window:
            return None
        return t > 1

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """visible: (B, 1, T, S') bool; bias: (B, H, T, S') for ALiBi, else None (made once per forward)."""
        if torch.compiler.is_compiling():
            return self._tensors()
        made = self.ctx.masks.get(self.n_keys)
        if made is None:
            made = self.ctx.masks[self.n_keys] = self._tensors()
        return made

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctx = self.ctx
        batch, t = ctx.position_ids.shape[0], ctx.total - ctx.start
        device = ctx.position_ids.device
        key_slots = torch.arange(ctx.total - self.n_keys, ctx.total, device=device)  # (S',)
        query_slots = ctx.cache_position  # (T,)
        distance = query_slots[:, None] - key_slots[None, :]  # (T, S')
        visible = (distance >= 0)[None]  # (1, T, S')
        if ctx.window is not None:
            visible &= distance < ctx.window
        if ctx.key_is_token is not None:
            visible = visible & ctx.key_is_token[:, key_slots][:, None, :]  # (B, T, S')
        visible |= (distance == 0)[None]  # a padding query sees itself
        bias = None
        if ctx.alibi_slopes is not None:
            q_pos = ctx.position_ids[:, ctx.start : ctx.total]  # (B, T)
            k_pos = ctx.position_ids[:, key_slots]  # (B, S')
            rel = (q_pos[:, :, None] - k_pos[:, None, :]).to(ctx.alibi_slopes.dtype)  # (B, T, S')
            bias = -ctx.alibi_slopes[None, :, None, None] * rel[:, None]
        return visible[:, None].expand(batch, 1, t, self.n_keys), bias
