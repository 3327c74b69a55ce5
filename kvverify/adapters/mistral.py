"""mistral-inference's ``BufferCache`` as a kvverify target: ``kvverify verify kvverify.adapters.mistral:buffer_cache``.

mistral-inference (1.6.0) keeps, per layer, a rectangular ring ``cache_k[layer]``, ``cache_v[layer]`` of
``(max_batch_size, cache_size, n_kv_heads, head_dim)``: ``cache_size`` is the sliding window, or ``max_seq_len``
without one, and token p of row b lives in slot ``p % cache_size`` (sequences of different lengths each keep their
own count, ``kv_seqlens``). Its transformer drives it once per forward:

- ``metadata = cache.get_input_metadata(seqlens)`` (one ``CacheInputMetadata`` per layer: which new tokens to
  keep, where they go, the xformers mask of the attention), then per layer ``view = cache.get_view(layer,
  metadata[layer])``;
- a prefill (any forward with a row of more than one token) attends to ``view.interleave_kv(xk, xv)``, each row's
  cached tokens unrotated (oldest first) followed by its new ones, and then writes ``view.update(xk, xv)``; a
  decoding step writes first and attends to the whole ring (the mask knows the rotation);
- ``cache.update_seqlens(seqlens)`` after the last layer.

:class:`MistralBufferCache` does exactly that behind kvverify's protocol: tokens of a ``(B, Hkv, T, D)`` update are
flattened row by row as mistral's ``(sum(seqlens), Hkv, D)``, with ``seqlens = [T] * B``; a prefill returns what
``interleave_kv`` returned, a decoding step the ring unrotated with mistral's own ``unrotate`` (the newest
``min(seen, cache_size)`` tokens, oldest first). ``reset`` is mistral's. BufferCache offers no crop and no reorder.

The cache imports xformers' attention-bias classes (``xformers.ops.fmha.attn_bias``), which load on the CPU; the
attention itself is kvverify's reference, so no xformers kernel runs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from kvverify.adapters import import_library
from kvverify.protocol.cache import KVCache
from kvverify.protocol.config import ModelConfig

INSTALL_HINT = "pip install 'kvverify[mistral-inference]' (mistral-inference 1.6.0), or run tox -e lib-mistral"


def import_mistral_cache() -> ModuleType:
    """``mistral_inference.cache``, or an ImportError that says what to install."""
    return import_library("mistral_inference.cache", needs="mistral-inference", install=INSTALL_HINT)


class MistralBufferCache:
    """mistral-inference's ``BufferCache`` behind kvverify's protocol (see the module's docstring); it holds no
    module object, so the suite's ``fork`` (a deepcopy) copies it.

    cache.cache_k[i], .cache_v[i]: (max_batch_size, cache_size, Hkv, D); cache.kv_seqlens: (B,) tokens per row.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.cache = import_mistral_cache().BufferCache(config.n_layers, config.max_batch_size, config.max_seq_len,
                                             config.n_kv_heads, config.head_dim, config.sliding_window)
        self.cache.to(torch.device(config.device), config.dtype)
        self.n_layers = config.n_layers
        self.metadata: list[Any] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, count, dim = key_states.shape  # (B, Hkv, T, D)
        seqlens = [count] * batch
        if layer_idx == 0:
            self.metadata = self.cache.get_input_metadata(seqlens)
        view = self.cache.get_view(layer_idx, self.metadata[layer_idx])
        xk = key_states.permute(0, 2, 1, 3).reshape(batch * count, heads, dim)  # (B*T, Hkv, D), row by row
        xv = value_states.permute(0, 2, 1, 3).reshape(batch * count, heads, dim)
        if view.prefill:
            keys, values = view.interleave_kv(xk, xv)  # (B*L, Hkv, D): per row, the cached tokens then the new
            view.update(xk, xv)
        else:
            view.update(xk, xv)
            unrotate = import_mistral_cache().unrotate  # (W, Hkv, D), seen -> (min(seen, W), Hkv, D), oldest first
            seen = [int(s) + count for s in self.cache.kv_seqlens]  # the step's token is in the ring now
            keys = torch.cat([unrotate(row, s) for row, s in zip(view.key, seen, strict=True)])
            values = torch.cat([unrotate(row, s) for row, s in zip(view.value, seen, strict=True)])
        if layer_idx == self.n_layers - 1:
            self.cache.update_seqlens(seqlens)
        kept = keys.shape[0] // batch
        return (keys.reshape(batch, kept, heads, dim).permute(0, 2, 1, 3),  # (B, Hkv, L, D)
                values.reshape(batch, kept, heads, dim).permute(0, 2, 1, 3))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens per row (mistral counts them for every layer at once, after the last layer's update)."""
        if not 0 <= layer_idx < self.n_layers:
            raise IndexError(f"layer {layer_idx} of a cache of {self.n_layers} layers")
        lengths = self.cache.kv_seqlens
        return 0 if lengths is None else int(lengths.max())

    def reset(self) -> None:
        self.cache.reset()
        self.metadata = []


def buffer_cache(config: ModelConfig) -> KVCache:
    """mistral-inference's ``BufferCache``: a ring of ``config.sliding_window`` slots per row and layer
    (``max_seq_len`` without a window), for ``config.max_batch_size`` rows."""
    return MistralBufferCache(config)
