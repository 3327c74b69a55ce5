"""torchtune's ``KVCache`` as a kvverify target: ``kvverify verify kvverify.adapters.torchtune:kv_cache``.

torchtune (0.6.1) keeps one ``torchtune.modules.KVCache`` module per attention layer: a fixed buffer
``(batch, n_kv_heads, max_seq_len, head_dim)`` allocated when the model's ``setup_caches(batch_size, dtype,
decoder_max_seq_len)`` runs, written at consecutive positions by ``update(k, v)``, which returns the whole
buffer (the model masks the unwritten tail). :class:`TorchtuneCache` puts those modules behind kvverify's
protocol: ``update(..., layer_idx)`` calls layer ``layer_idx``'s module, ``get_seq_length`` reads its ``size``,
``reset`` is torchtune's own. torchtune offers no crop and no reorder, so neither does the adapter.

The batch is fixed at setup. torchtune's check refuses a larger batch, but a smaller one passes it and is
broadcast into every row of the buffer, and the buffer's batch comes back: a batch-1 update of a cache set up
for 4 returns 4 rows. So the factory declares the one batch it is set up for (``max_batch_size=1``: every
example the suite draws then has batch 1).

torchtune needs torchao at import (0.6.1 imports ``torchao.dtypes.nf4tensor``, which torchao 0.12 and later no
longer have): ``pip install 'kvverify[torchtune]'`` installs torchtune 0.6.1 with torchao 0.11.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from kvverify.adapters import import_library
from kvverify.protocol.cache import CacheDeclaration, KVCache
from kvverify.protocol.config import ModelConfig

INSTALL_HINT = "pip install 'kvverify[torchtune]' (torchtune 0.6.1 with torchao 0.11)"

#: The batch the factory sets torchtune's buffers up for, and declares.
BATCH = 1


def import_torchtune_modules() -> ModuleType:
    """``torchtune.modules``, or an ImportError that says what to install."""
    return import_library("torchtune.modules", needs="torchtune", install=INSTALL_HINT)


class TorchtuneCache:
    """One ``torchtune.modules.KVCache`` per layer, behind kvverify's protocol.

    layers[i].k_cache, .v_cache: (batch, n_kv_heads, max_seq_len, head_dim), written at ``cache_pos``.
    """

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.layers[layer_idx].update(key_states, value_states)  # (B, Hkv, max_seq_len, D)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx].size)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


def setup_caches(config: ModelConfig, batch_size: int) -> TorchtuneCache:
    """What torchtune's ``TransformerDecoder.setup_caches(batch_size, dtype, decoder_max_seq_len)`` builds for a
    model of ``config``: one ``KVCache`` per layer, on ``config.device``."""
    kv_cache_class = import_torchtune_modules().KVCache
    layers = [
        kv_cache_class(batch_size=batch_size, max_seq_len=config.max_seq_len, num_kv_heads=config.n_kv_heads,
                       head_dim=config.head_dim, dtype=config.dtype).to(config.device)
        for _ in range(config.n_layers)
    ]
    return TorchtuneCache(layers)


def kv_cache(config: ModelConfig) -> KVCache:
    """torchtune's ``KVCache`` per layer, set up for a batch of :data:`BATCH` (declared) and
    ``config.max_seq_len`` tokens."""
    return setup_caches(config, BATCH)


kv_cache.kvverify_declaration = CacheDeclaration(max_batch_size=BATCH)  # type: ignore[attr-defined]
