"""Driving a cache that applies RoPE itself (``CacheDeclaration(positional="rope")``).

The reference model rotates keys before caching. For a cache that rotates them itself, :class:`RotatingCache`
stands between the model and the cache: it turns each rotated key back into the key before rotation (in
float64, then the model's dtype) and hands the cache that, with the rotation it must apply::

    update(key_states, value_states, layer_idx, {"cache_position": (T,), "cos": (B, T, D), "sin": (B, T, D)})

where ``rotated = k * cos[:, None] + rotate_half(k) * sin[:, None]`` (transformers' Llama layout:
``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``), ``cos``/``sin`` in the model's dtype, and returns
rotated keys, as any cache does. Undoing a rotation is not exact to the last bit, so such a cache is
compared within the dtype's fast-numerics tolerance (:meth:`Target.tolerance`), and positions are the cache
positions: the suite draws such a cache's models with RoPE and without left padding.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify.protocol.cache import KVCache
from kvverify.protocol.config import ModelConfig
from kvverify.reference.numerics import rope_tables, rotate_half


class RotatingCache:
    """``inner``, a cache that applies RoPE itself, fed keys before rotation; optional methods pass through."""

    def __init__(self, inner: KVCache, config: ModelConfig) -> None:
        self.inner, self.config = inner, config

    def update(
        self,
        key_states: torch.Tensor,  # (B, Hkv, T, D), rotated by the model
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(cache_kwargs or {})
        positions = kwargs["cache_position"]  # (T,)
        batch = key_states.shape[0]
        cos, sin = rope_tables(positions[None].expand(batch, -1), self.config.head_dim, self.config.rope_theta,
                               torch.float64)  # (B, 1, T, D) each
        wide = key_states.double()
        plain = (wide * cos - rotate_half(wide) * sin).to(key_states.dtype)  # rotation by -position
        kwargs["cos"], kwargs["sin"] = cos[:, 0].to(key_states.dtype), sin[:, 0].to(key_states.dtype)
        return self.inner.update(plain, value_states, layer_idx, kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("inner", "config"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What a RoPE-applying cache does with what :class:`RotatingCache` hands it: keys (B, Hkv, T, D), cos and
    sin (B, T, D) -> rotated keys (B, Hkv, T, D)."""
    return keys * cos[:, None] + rotate_half(keys) * sin[:, None]
