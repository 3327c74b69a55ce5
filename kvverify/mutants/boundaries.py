"""Caches that break only on a boundary: an allocation chunk of 128 tokens crossed by a multi-token append, a
crop to a whole number of pages, a fork whose last page is partly filled. Each has a correct control beside it
(the same cache without the bug), which the suite must pass: the mutants are only worth killing if the control
survives the same draws.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kvverify.caches import PagedCache
from kvverify.caches._common import check_layer_order
from kvverify.protocol.cache import CacheDeclaration, resolve_crop
from kvverify.protocol.config import ModelConfig

#: Engines allocate in chunks of 128, 256 and 512 tokens; the default shapes reach past 128.
CHUNK = 128
#: Pages of 16 tokens, as engines use (vLLM's default block size).
PAGE = 16


class ChunkedGrowth:
    """Per layer, (B, Hkv, capacity, D) buffers grown ``CHUNK`` tokens at a time, written by position."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    @classmethod
    def from_config(cls, config: ModelConfig) -> ChunkedGrowth:
        return cls()

    def _grow(self, layer: int, like: torch.Tensor, end: int) -> None:
        """Room for ``end`` tokens, in whole chunks; the tokens held so far are copied over."""
        capacity = -(-end // CHUNK) * CHUNK
        batch, heads, _, dim = like.shape
        keys = like.new_zeros(batch, heads, capacity, dim)
        values = like.new_zeros(batch, heads, capacity, dim)
        held = self.lengths[layer]
        keys[:, :, :held], values[:, :, :held] = self.keys[layer][:, :, :held], self.values[layer][:, :, :held]
        self.keys[layer], self.values[layer] = keys, values

    def _write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, start: int) -> None:
        end = start + key_states.shape[-2]
        if end > self.keys[layer].shape[2]:
            self._grow(layer, key_states, end)
        self.keys[layer][:, :, start:end] = key_states
        self.values[layer][:, :, start:end] = value_states

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_layer_order(layer_idx, len(self.keys))
        if layer_idx == len(self.keys):
            empty = key_states[:, :, :0]
            self.keys.append(empty)
            self.values.append(value_states[:, :, :0])
            self.lengths.append(0)
        start = self.lengths[layer_idx]
        self._write(layer_idx, key_states, value_states, start)
        self.lengths[layer_idx] = start + key_states.shape[-2]
        held = self.lengths[layer_idx]
        return self.keys[layer_idx][:, :, :held], self.values[layer_idx][:, :, :held]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.lengths = [min(length, keep) for length in self.lengths]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in range(len(self.keys)):
            index = beam_idx.to(self.keys[layer].device)
            self.keys[layer] = self.keys[layer].index_select(0, index)
            self.values[layer] = self.values[layer].index_select(0, index)

    def reset(self) -> None:
        self.keys, self.values, self.lengths = [], [], []


class ChunkGrowthDropsStraddlingHead(ChunkedGrowth):
    """EricLBuehler/mistral.rs #917 (a KV cache that grows in steps): an append that straddles the end of the allocated
    chunk is written in two parts, the head into the old buffer and the rest after the growth, but the growth
    copies only the tokens held before the append, so the head is lost (zero keys and values). A prefill into an
    empty cache or an append inside one chunk never shows it; only a multi-token append across 128, 256, ..."""

    def _write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, start: int) -> None:
        end, capacity = start + key_states.shape[-2], self.keys[layer].shape[2]
        if end <= capacity or start == capacity:
            super()._write(layer, key_states, value_states, start)
            return
        head = capacity - start  # tokens that fit in the old chunk
        self.keys[layer][:, :, start:], self.values[layer][:, :, start:] = key_states[:, :, :head], value_states[
            :, :, :head]
        self._grow(layer, key_states, end)  # copies lengths[layer] == start tokens: the head stays behind
        self.keys[layer][:, :, capacity:end] = key_states[:, :, head:]
        self.values[layer][:, :, capacity:end] = value_states[:, :, head:]


class PagedWithPointer(PagedCache):
    """The built-in paged cache with pages of ``PAGE`` tokens and a write pointer of its own per layer (as engines
    keep one per sequence), which ``crop`` rewinds: the next append writes at the pointer."""

    kvverify_declaration = CacheDeclaration(block_size=PAGE)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pointers = [0] * len(self.lengths)

    @classmethod
    def from_config(cls, config: ModelConfig, block_size: int = PAGE) -> PagedWithPointer:
        blocks_per_row = -(-config.max_seq_len // block_size)
        return cls(n_layers=config.n_layers, num_blocks=config.max_batch_size * blocks_per_row,
                   block_size=block_size, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                   dtype=config.dtype, device=config.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        start, count = self.pointers[layer_idx], key_states.shape[-2]
        position = torch.arange(start, start + count, device=key_states.device)
        keys, values = super().update(key_states, value_states, layer_idx, {"cache_position": position})
        self.pointers[layer_idx] = start + count
        return keys, values

    def rewound_pointer(self, keep: int) -> int:
        """Where the next append goes after a crop to ``keep`` tokens."""
        return keep

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        super().crop(max_length)
        self.pointers = [min(pointer, self.rewound_pointer(keep)) for pointer in self.pointers]

    def reset(self) -> None:
        super().reset()
        self.pointers = [0] * len(self.pointers)


class CropToPageRewindsPointer(PagedWithPointer):
    """RBLN-SW/vllm-rbln #326 (writes near a block boundary after speculative decoding) as a rollback bug: a
    crop to a whole number of pages rewinds the write pointer to the start of the last kept page (the pointer
    is computed as ``(keep - 1) // page * page`` where ``keep // page * page`` was meant), so the next append
    overwrites a whole page of kept keys. Any other crop length is right."""

    def rewound_pointer(self, keep: int) -> int:
        return (keep - 1) // self.block_size * self.block_size if keep % self.block_size == 0 and keep else keep


class ForkablePaged(PagedCache):
    """A paged cache whose fork (``copy.deepcopy``) shares full pages with the original, copy-on-write, and
    copies the partly filled last page, as prefix-caching engines do. Copies share one pool of pages; a page
    with more than one owner is copied before it is written."""

    kvverify_declaration = CacheDeclaration(block_size=PAGE)
    #: forks leave earlier sessions' pages held: a pool this many times what one sequence per row needs
    SPARE = 16

    @classmethod
    def from_config(cls, config: ModelConfig, block_size: int = PAGE) -> ForkablePaged:
        blocks_per_row = -(-config.max_seq_len // block_size)
        return cls(n_layers=config.n_layers, num_blocks=cls.SPARE * config.max_batch_size * blocks_per_row,
                   block_size=block_size, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                   dtype=config.dtype, device=config.device)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owners: dict[int, int] = {}  # page id -> how many block tables hold it (absent: one)

    def _writable(self, table: list[int], index: int) -> None:
        """Give ``table`` its own copy of its ``index``-th page when another table holds it too."""
        page = table[index]
        if self.owners.get(page, 1) == 1:
            return
        if not self.free_blocks:
            raise RuntimeError("ForkablePaged is out of pages; build it with more num_blocks")
        own = self.free_blocks.pop()
        for pool in (*self.key_pool, *self.value_pool):
            pool[own] = pool[page]
        self.owners[page] -= 1
        table[index] = own

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        start, count = self.lengths[layer_idx], key_states.shape[-2]
        for table in self.block_tables:
            for index in range(start // self.block_size, min(len(table), -(-(start + count) // self.block_size))):
                self._writable(table, index)
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def _release(self, page: int) -> None:
        held = self.owners.pop(page, 1)
        if held > 1:
            self.owners[page] = held - 1
        else:
            self.free_blocks.append(page)

    def _release_all(self) -> None:
        for table in self.block_tables:
            for page in table:
                self._release(page)
        self.block_tables = []

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.lengths = [min(length, keep) for length in self.lengths]
        needed = -(-max(self.lengths) // self.block_size)
        for table in self.block_tables:
            while len(table) > needed:
                self._release(table.pop())

    def reset(self) -> None:
        self._release_all()  # the pool is shared with forks: its pages are not zeroed here
        self.lengths = [0] * len(self.lengths)

    def shares_last_page(self) -> bool:
        """Whether a fork shares the partly filled last page too (it must copy it)."""
        return False

    def __deepcopy__(self, memo: dict[int, Any]) -> ForkablePaged:
        twin = copy.copy(self)  # the pools, the free list and the owner counts are shared by every copy
        twin.lengths, twin.block_tables = list(self.lengths), [list(table) for table in self.block_tables]
        partial = max(self.lengths, default=0) % self.block_size != 0
        for table in twin.block_tables:
            for index, page in enumerate(table):
                if partial and index == len(table) - 1 and not self.shares_last_page():
                    own = self.free_blocks.pop()
                    for pool in (*self.key_pool, *self.value_pool):
                        pool[own] = pool[page]
                    table[index] = own
                elif not (partial and index == len(table) - 1):
                    self.owners[page] = self.owners.get(page, 1) + 1
        return twin


class ForkSharesPartialPage(ForkablePaged):
    """Avarok-Cybersecurity/atlas #1193 (a prefix cache that hands a partly filled tail block to a second writer
    with no copy-on-write): the fork shares the last, partly filled page as if it were full and owned, so the
    copy and the original write their next tokens into the same page and each reads the other's. A fork at a
    whole number of pages has no such page and shows nothing."""

    def shares_last_page(self) -> bool:
        return True


#: The correct caches beside the mutants, run as controls by ``kvverify mutants``.
CONTROLS: dict[str, Any] = {
    "chunked-growth": ChunkedGrowth.from_config,
    "paged-pointer": PagedWithPointer.from_config,
    "paged-fork": ForkablePaged.from_config,
}
