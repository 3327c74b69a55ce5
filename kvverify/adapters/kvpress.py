"""NVIDIA's kvpress presses as kvverify targets: ``kvverify verify kvverify.adapters.kvpress:knorm_press_cache``.

A kvpress "press" compresses the KV cache once, after the prefill: ``BasePress.forward_hook`` runs after each
attention layer's forward, and when that forward was the prefill (``cache_position[-1] + 1 == q_len``) it calls
``press.compress(module, hidden_states, keys, values, attentions, kwargs)`` on the layer's keys and values and
writes the result back to ``cache.layers[i].keys / .values`` of transformers' ``DynamicCache``.
:class:`PressedCache` does exactly that behind kvverify's protocol: ``update`` writes to a ``DynamicCache``,
returns what it returned (the prefill attends to every token), then calls the press's own ``forward_hook``.

What the suite needs beyond that (:mod:`kvverify.protocol.eviction`):

- ``kept_positions(layer)``: which slots the press kept. The wrapped presses score from the keys alone (Knorm,
  StreamingLLM, KeyDiff, Random): the adapter calls ``press.compress`` once more with the slot numbers (float64)
  as values, which it gathers with the same indices; the values the press really kept are then compared with the
  recomputed ones of those slots, bit for bit, by the eviction oracle;
- ``get_seq_length()``: the tokens seen, the next token's position. ``DynamicCache.get_seq_length()`` after
  compression counts the tokens *kept* (12 -> 6 at ratio 0.5), so a forward without explicit positions would
  rotate the next token at position 6, not 12; kvpress' pipeline passes ``position_ids`` itself, and so does
  this adapter's caller (the reference model derives positions from the tokens seen).

kvpress 0.5.5 requires transformers>=4.56,<5.3, older than kvverify's transformers extra: it runs in an
environment of its own, ``tox -e lib-kvpress`` (constraints/kvpress.txt).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from kvverify.adapters import import_library
from kvverify.protocol.cache import CacheDeclaration, Unsupported
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.eviction import Eviction

INSTALL_HINT = "tox -e lib-kvpress (or pip install kvpress==0.5.5 -c constraints/kvpress.txt in an env of its own)"

#: The compression ratio of every wrapped press.
RATIO = 0.5
#: StreamingLLMPress' default sinks.
N_SINK = 4


def import_kvpress() -> ModuleType:
    """``kvpress``, or an ImportError that says how to install it."""
    return import_library("kvpress", needs="kvpress", install=INSTALL_HINT)


@dataclass(frozen=True)
class HeadCounts:
    """The part of a transformers config a press reads from ``module.config``."""

    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int


@dataclass(frozen=True)
class RotaryTable:
    """What ``KeyRerotationPress`` reads from ``module.rotary_emb``: inv_freq (head_dim // 2,)."""

    inv_freq: torch.Tensor


@dataclass(frozen=True)
class AttentionLayer:
    """What ``forward_hook`` and ``compress`` read from the attention module: its index, head_dim and config
    (and the RoPE frequencies, for presses that rerotate keys)."""

    layer_idx: int
    head_dim: int
    config: HeadCounts
    rotary_emb: RotaryTable | None = None


class PressedCache:
    """transformers' ``DynamicCache`` with ``press`` applied after the prefill, as its forward hook does.

    slots[i]: (B, Hkv, S) long, the original slot of each token layer i holds; seen[i]: tokens written."""

    def __init__(self, press: Any, config: ModelConfig, dynamic_cache: Any, min_prefill: int = 1) -> None:
        self.press, self.cache, self.min_prefill = press, dynamic_cache, min_prefill
        counts = HeadCounts(config.n_heads, config.n_kv_heads, config.d_model)
        lanes = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        rotary = RotaryTable(1.0 / config.rope_theta ** lanes)  # (head_dim // 2,), Llama's inv_freq
        self.modules = [AttentionLayer(i, config.head_dim, counts, rotary) for i in range(config.n_layers)]
        self.slots: list[torch.Tensor] = []
        self.seen: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        position = (cache_kwargs or {}).get("cache_position")
        if position is None:
            raise ValueError("PressedCache.update needs cache_kwargs['cache_position'] (T,): kvpress tells the "
                             "prefill by it (cache_position[-1] + 1 == q_len)")
        batch, _, t, _ = key_states.shape
        if layer_idx == len(self.seen):
            if t < self.min_prefill:
                raise Unsupported(f"a prefill of {t} tokens: {type(self.press).__name__} needs more than "
                                  f"{self.min_prefill - 1}")
            self.slots.append(torch.zeros(batch, key_states.shape[1], 0, dtype=torch.long, device=position.device))
            self.seen.append(0)
        keys, values = self.cache.update(key_states, value_states, layer_idx, cache_kwargs)  # (B, Hkv, S, D)
        new = position.to(torch.long).expand(batch, key_states.shape[1], t)
        self.slots[layer_idx] = torch.cat((self.slots[layer_idx], new), dim=-1)
        self.seen[layer_idx] += t
        module = self.modules[layer_idx]
        hidden = torch.zeros(batch, t, module.config.hidden_size, dtype=key_states.dtype, device=key_states.device)
        hook_kwargs = {"hidden_states": hidden, "past_key_values": self.cache, "cache_position": position,
                       "position_embeddings": None}
        held = self.cache.layers[layer_idx].keys.shape[-2]
        self.press.forward_hook(module, [], hook_kwargs, (None, None))
        if self.cache.layers[layer_idx].keys.shape[-2] != held:  # compressed: which slots did it keep?
            tags = self.slots[layer_idx][..., None].expand(*keys.shape[:3], 1).to(torch.float64)  # (B, Hkv, S, 1)
            _, kept = self.press.compress(module, hidden, keys, tags.expand(*keys.shape[:3], keys.shape[-1]),
                                          None, hook_kwargs)
            self.slots[layer_idx] = kept[..., 0].to(torch.long)
        return keys, values

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, S) long: the original slot of each token layer ``layer_idx`` holds, in its order."""
        return self.slots[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen (the next token's position); ``self.cache.get_seq_length()`` counts the kept ones."""
        return self.seen[layer_idx] if layer_idx < len(self.seen) else 0


def pressed_cache(press: Any, config: ModelConfig, min_prefill: int = 1) -> PressedCache:
    """Any kvpress press on a fresh ``DynamicCache``, for a model of ``config``."""
    transformers = importlib.import_module("transformers")
    return PressedCache(press, config, transformers.DynamicCache(), min_prefill)


def _pressed(press_name: str, config: ModelConfig, min_prefill: int = 1, **options: Any) -> PressedCache:
    press = getattr(import_kvpress(), press_name)(compression_ratio=RATIO, **options)
    return pressed_cache(press, config, min_prefill)


def knorm_press_cache(config: ModelConfig) -> PressedCache:
    """``KnormPress(0.5)``: keeps the keys of smallest L2 norm, per KV head."""
    return _pressed("KnormPress", config)


def streaming_llm_press_cache(config: ModelConfig) -> PressedCache:
    """``StreamingLLMPress(0.5, n_sink=4)``: the 4 first tokens and the newest; prompts of more than 4 tokens
    (kvpress asserts it; shorter ones are Unsupported)."""
    return _pressed("StreamingLLMPress", config, min_prefill=N_SINK + 1, n_sink=N_SINK)


def streaming_llm_past_sinks_cache(config: ModelConfig) -> PressedCache:
    """``StreamingLLMPress(0.5, n_sink=4)`` on prompts of at least ``2 * n_sink`` tokens, where every sink is
    kept (shorter ones are Unsupported): the press' rule where it keeps its sinks."""
    return _pressed("StreamingLLMPress", config, min_prefill=2 * N_SINK, n_sink=N_SINK)


def keydiff_press_cache(config: ModelConfig) -> PressedCache:
    """``KeyDiffPress(0.5)``: keeps the keys least similar to the mean key direction (checked by count)."""
    return _pressed("KeyDiffPress", config)


def random_press_cache(config: ModelConfig) -> PressedCache:
    """``RandomPress(0.5, seed=0)``: a seeded random subset (checked by count)."""
    return _pressed("RandomPress", config, seed=0)


knorm_press_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    keeps=Eviction("smallest_key_norm", RATIO))
streaming_llm_press_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    keeps=Eviction("sinks_window", RATIO, n_sink=N_SINK))
streaming_llm_past_sinks_cache.kvverify_declaration = (  # type: ignore[attr-defined]
    streaming_llm_press_cache.kvverify_declaration)  # type: ignore[attr-defined]
keydiff_press_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    keeps=Eviction("count", RATIO))
random_press_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    keeps=Eviction("count", RATIO))
