"""A paged cache: fixed-size blocks in a shared pool and a block table per sequence (vLLM's PagedAttention)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches._common import check_layer_order, new_positions
from kvverify.protocol.cache import resolve_crop
from kvverify.protocol.config import ModelConfig


class PagedCache:
    """Per layer, a pool of (num_blocks, Hkv, block_size, D) blocks. Row ``b``'s token ``p`` lives in block
    ``block_table[b][p // block_size]`` at offset ``p % block_size``; blocks come from a free list when a row
    crosses a block boundary and go back to it on crop, reorder and reset. Every layer shares the table."""

    def __init__(
        self,
        *,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1; got {block_size} and {num_blocks}")
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.key_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.value_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size = block_size
        self.free_blocks: list[int] = list(range(num_blocks))
        self.block_tables: list[list[int]] = []  # one list of block ids per batch row
        self.lengths = [0] * n_layers

    @classmethod
    def from_config(cls, config: ModelConfig, block_size: int = 4) -> PagedCache:
        blocks_per_row = -(-config.max_seq_len // block_size)
        return cls(
            n_layers=config.n_layers,
            num_blocks=config.max_batch_size * blocks_per_row,
            block_size=block_size,
            n_kv_heads=config.n_kv_heads,
            head_dim=config.head_dim,
            dtype=config.dtype,
            device=config.device,
        )

    def _ensure_blocks(self, batch: int, length: int) -> None:
        if not self.block_tables:
            self.block_tables = [[] for _ in range(batch)]
        needed = -(-length // self.block_size)
        for table in self.block_tables:
            while len(table) < needed:
                if not self.free_blocks:
                    raise RuntimeError("PagedCache is out of blocks; build it with more num_blocks")
                table.append(self.free_blocks.pop())

    def _locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids (B, T) and offsets (T,) of the given token positions (T,)."""
        table = torch.tensor(self.block_tables, dtype=torch.long, device=positions.device)  # (B, blocks)
        return table[:, positions // self.block_size], positions % self.block_size

    def _gather(self, layer_idx: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens 0..length-1 of a layer: (B, Hkv, length, D)."""
        blocks, offsets = self._locate(torch.arange(length, device=self.key_pool[layer_idx].device))
        keys = self.key_pool[layer_idx][blocks, :, offsets]  # (B, length, Hkv, D)
        values = self.value_pool[layer_idx][blocks, :, offsets]
        return keys.transpose(1, 2), values.transpose(1, 2)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.key_pool):
            check_layer_order(layer_idx, len(self.key_pool))
        batch, _, count, _ = key_states.shape
        positions = new_positions(cache_kwargs, self.lengths[layer_idx], count, key_states.device)
        length = max(self.lengths[layer_idx], int(positions.max()) + 1)
        self._ensure_blocks(batch, length)
        blocks, offsets = self._locate(positions)
        self.key_pool[layer_idx][blocks, :, offsets] = key_states.transpose(1, 2)
        self.value_pool[layer_idx][blocks, :, offsets] = value_states.transpose(1, 2)
        self.lengths[layer_idx] = length
        return self._gather(layer_idx, length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def _release_all(self) -> None:
        for table in self.block_tables:
            self.free_blocks.extend(table)
        self.block_tables = []

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.lengths = [min(length, keep) for length in self.lengths]
        needed = -(-max(self.lengths) // self.block_size)
        for table in self.block_tables:
            while len(table) > needed:
                self.free_blocks.append(table.pop())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Copy the chosen rows into fresh blocks (a duplicated row gets its own copy)."""
        if not self.block_tables:
            return
        contents = [self._gather(layer, self.lengths[layer]) for layer in range(len(self.key_pool))]
        self._release_all()
        self._ensure_blocks(beam_idx.numel(), max(self.lengths))
        for layer, (keys, values) in enumerate(contents):
            if self.lengths[layer] == 0:
                continue
            index = beam_idx.to(keys.device)
            blocks, offsets = self._locate(torch.arange(self.lengths[layer], device=keys.device))
            self.key_pool[layer][blocks, :, offsets] = keys.index_select(0, index).transpose(1, 2)
            self.value_pool[layer][blocks, :, offsets] = values.index_select(0, index).transpose(1, 2)

    def reset(self) -> None:
        self._release_all()
        self.lengths = [0] * len(self.lengths)
        for pool in (*self.key_pool, *self.value_pool):
            pool.zero_()
