"""litgpt's ``KVCache`` as a kvverify target: ``kvverify verify kvverify.adapters.litgpt:kv_cache`` (a buffer of
``max_seq_len`` slots) and ``kvverify.adapters.litgpt:sliding_kv_cache`` (the ring of a sliding-window layer).

litgpt (0.5.12 and later) keeps one ``litgpt.model.KVCache`` module per attention layer, built by
``model.set_kv_cache(batch_size, max_seq_length)`` through ``CausalSelfAttention.build_kv_cache``: buffers ``k``,
``v`` of ``(batch_size, n_query_groups, size, head_size)``, where ``size`` is ``max_seq_length``, or
``min(max_seq_length, sliding_window_size)`` in a sliding-window layer. ``forward(input_pos, k, v)`` writes the new
tokens at ``input_pos`` (absolute positions; in a sliding layer at ``input_pos % size``, a ring) and returns

- the full buffers ``(bs, n_query_groups, max_seq_length, head_size)`` (the model masks the unwritten tail), or,
- in a sliding layer, the first ``max(input_pos) + 1`` slots while the ring has not wrapped, and all ``size``
  slots in ring order once it has (slot ``p % size`` holds token ``p``).

:class:`LitgptCache` puts those modules behind kvverify's protocol: ``update(..., layer_idx, cache_kwargs)`` calls
layer ``layer_idx``'s module with ``input_pos = cache_kwargs["cache_position"]`` and returns what it returned, a
wrapped ring rotated so that its slots come oldest first. litgpt keeps no length (its callers pass positions), so
the adapter counts the tokens written; ``crop`` of the full buffer rewinds that count, as litgpt's callers rewind
``input_pos``, and ``reset`` zeroes the buffers (litgpt's ``reset_parameters``). litgpt refuses a sliding-window
update longer than the ring (``ValueError: Prefill length ... exceeds the sliding window size``, since 0.5.13): the
adapter raises :class:`~kvverify.protocol.cache.Unsupported` for it, so the suite skips those examples and counts
them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from kvverify.adapters import import_library
from kvverify.protocol.cache import KVCache, Unsupported, resolve_crop
from kvverify.protocol.config import ModelConfig

INSTALL_HINT = "pip install 'kvverify[litgpt]' (litgpt 0.5.13), or run tox -e lib-litgpt"


def import_litgpt_model() -> ModuleType:
    """``litgpt.model``, or an ImportError that says what to install."""
    return import_library("litgpt.model", needs="litgpt", install=INSTALL_HINT)


def build_layer(config: ModelConfig, window: int | None) -> Any:
    """One ``litgpt.model.KVCache``, as ``CausalSelfAttention.build_kv_cache(max_batch_size, max_seq_len)`` builds
    it for a layer of a model of ``config``: a ring of ``min(max_seq_len, window)`` slots when ``window`` is given."""
    size = config.max_seq_len if window is None else min(config.max_seq_len, window)
    shape = (config.max_batch_size, config.n_kv_heads, size, config.head_dim)  # (B, n_query_groups, size, hs)
    return import_litgpt_model().KVCache(shape, shape, device=torch.device(config.device), dtype=config.dtype,
                                         is_sliding_window=window is not None, sliding_window_size=window)


class LitgptCache:
    """One litgpt ``KVCache`` per layer behind kvverify's protocol (see the module's docstring).

    layers[i].k, .v: (max_batch_size, Hkv, size, D); seen[i]: tokens written to layer i.
    """

    def __init__(self, config: ModelConfig, window: int | None) -> None:
        self.window = window
        self.layers = [build_layer(config, window) for _ in range(config.n_layers)]
        self.seen = [0] * config.n_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (cache_kwargs or {}).get("cache_position")
        if not isinstance(positions, torch.Tensor):
            raise ValueError("litgpt's KVCache writes at explicit positions: pass cache_kwargs={'cache_position': "
                             f"LongTensor (T,)}} to update; got cache_kwargs={cache_kwargs!r}")
        try:
            keys, values = self.layers[layer_idx](positions, key_states, value_states)  # (B, Hkv, S, D)
        except ValueError as error:
            if "exceeds the sliding window size" in str(error):
                raise Unsupported(f"litgpt refuses an update longer than its ring: {error}") from error
            raise
        total = int(positions.max()) + 1
        self.seen[layer_idx] = total
        size = keys.shape[-2]
        if self.window is not None and total > size:  # the ring wrapped: slot p % size holds token p
            oldest_first = torch.arange(total - size, total, device=keys.device) % size
            return keys[:, :, oldest_first], values[:, :, oldest_first]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen[layer_idx]

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()
        self.seen = [0] * len(self.layers)


class LitgptFullCache(LitgptCache):
    """The full buffer, which can rewind: the next update writes over the tokens cropped away."""

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.seen = [min(seen, keep) for seen in self.seen]


def kv_cache(config: ModelConfig) -> KVCache:
    """litgpt's ``KVCache`` per layer, ``config.max_seq_len`` slots for ``config.max_batch_size`` rows (a model of
    ``config`` masks a window itself: this is the cache of a layer without ``sliding_window_indices``)."""
    return LitgptFullCache(config, None)


def sliding_kv_cache(config: ModelConfig) -> KVCache:
    """litgpt's ring ``KVCache`` per layer, ``min(max_seq_len, sliding_window)`` slots, as litgpt builds it for a
    sliding-window layer. A model without a window gets the ring litgpt builds for a window no shorter than the
    cache (``max_seq_len`` slots, which never wrap)."""
    return LitgptCache(config, config.sliding_window or config.max_seq_len)
