"""A preallocated cache written by position (transformers' StaticCache, gpt-fast's KVCache)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches._common import new_positions
from kvverify.protocol.cache import CacheDeclaration, resolve_crop
from kvverify.protocol.config import ModelConfig


class StaticCache:
    """Per layer, a zeroed (max_batch, Hkv, max_seq_len, D) buffer; tokens are written at their
    ``cache_position`` and the whole buffer (for the batch in use) is returned: the model masks the
    unwritten tail.

    Under ``torch.compile`` or CUDA graph capture the lengths go to a tensor written in place (a Python int
    would be specialised on, a recompile every step; reading a tensor into one would synchronise, which a
    capture forbids), allocated by the first such update and folded into the Python ints when read."""

    kvverify_declaration = CacheDeclaration(compile=True)

    def __init__(
        self,
        *,
        n_layers: int,
        max_batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers
        self.batch_size = max_batch_size
        self._seen: torch.Tensor | None = None  # (n_layers,) lengths written by compiled or captured updates

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> StaticCache:
        """Buffers for ``config``'s shape, in ``dtype`` (default: the model's)."""
        return cls(
            n_layers=config.n_layers,
            max_batch_size=config.max_batch_size,
            n_kv_heads=config.n_kv_heads,
            max_seq_len=config.max_seq_len,
            head_dim=config.head_dim,
            dtype=config.dtype if dtype is None else dtype,
            device=config.device,
        )

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.keys):
            raise IndexError(f"layer {layer_idx} is out of range for a StaticCache of {len(self.keys)} layers")
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # (max_batch, Hkv, max_seq_len, D)
        batch, _, count, _ = key_states.shape
        if batch > keys.shape[0]:
            raise ValueError(f"batch {batch} exceeds this StaticCache's max_batch_size {keys.shape[0]}")
        self.batch_size = batch
        if batch < keys.shape[0]:
            keys, values = keys[:batch], values[:batch]
        positions = new_positions(cache_kwargs, self.lengths[layer_idx], count, key_states.device)
        keys.index_copy_(2, positions, key_states)
        values.index_copy_(2, positions, value_states)
        if torch.compiler.is_compiling() or _capturing(positions):
            if self._seen is None:
                self._seen = torch.zeros(len(self.keys), dtype=torch.long, device=positions.device)
            self._seen[layer_idx] = torch.maximum(self._seen[layer_idx], positions.max() + 1)
        else:
            self.lengths[layer_idx] = max(self.lengths[layer_idx], int(positions.max()) + 1)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._seen is not None:
            return max(self.lengths[layer_idx], int(self._seen[layer_idx]))
        return self.lengths[layer_idx]

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        for layer in range(len(self.keys)):
            self.keys[layer][:, :, keep:] = 0
            self.values[layer][:, :, keep:] = 0
            self.lengths[layer] = min(self.get_seq_length(layer), keep)
        if self._seen is not None:
            self._seen.clamp_(max=keep)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        rows = beam_idx.numel()
        for layer in range(len(self.keys)):
            for buffers in (self.keys, self.values):
                reordered = buffers[layer][: self.batch_size].index_select(0, beam_idx.to(buffers[layer].device))
                buffers[layer][:rows] = reordered
        self.batch_size = rows

    def reset(self) -> None:
        for layer in range(len(self.keys)):
            self.keys[layer].zero_()
            self.values[layer].zero_()
            self.lengths[layer] = 0
        if self._seen is not None:  # zeroed in place: a captured graph keeps writing to this very tensor
            self._seen.zero_()


def _capturing(positions: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (no host synchronisation allowed)."""
    return positions.is_cuda and torch.cuda.is_current_stream_capturing()
