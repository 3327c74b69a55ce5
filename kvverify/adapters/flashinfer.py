"""FlashInfer's paged KV cache as a kvverify target: ``kvverify verify kvverify.adapters.flashinfer:paged_kv_cache
--device cuda``.

FlashInfer keeps keys and values in pages, per layer a pair of tensors ``(max_pages, PAGE_SIZE, n_kv_heads,
head_dim)`` (the ``NHD`` layout), described to its kernels by a CSR page table: ``kv_indptr`` (B + 1,), the pages
of row b being ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``, and ``kv_last_page_len`` (B,), the tokens in each
row's last page. ``flashinfer.append_paged_kv_cache`` writes new tokens at (``batch_indices``, ``positions``)
through that table. The reference model attends to contiguous keys, so :class:`FlashInferPagedCache` gathers
the pages back, ``(B, n_kv_heads, S, head_dim)``, after each append.

The page-table bookkeeping (:class:`PageTable`), the gather and a pure-torch append with FlashInfer's semantics
(:func:`torch_append`) run anywhere: ``paged_kv_cache_torch`` is the same cache on the CPU, which kvverify
verifies without CUDA. ``paged_kv_cache`` calls FlashInfer's kernel; it needs CUDA and ``flashinfer-python``
(``pip install 'kvverify[flashinfer]'``) and declares ``devices=("cuda",)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvverify.adapters import import_library
from kvverify.protocol.cache import CacheDeclaration, KVCache
from kvverify.protocol.config import ModelConfig

PAGE_SIZE = 16
INSTALL_HINT = "pip install 'kvverify[flashinfer]' (flashinfer-python; CUDA only)"

#: append(key (N, Hkv, D), value, batch_indices (N,), positions (N,), pages (k, v), table) -> None
Append = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                   "PageTable"], None]


class PageTable:
    """Which pages hold which row's tokens; every row holds ``length`` tokens (left padding included).

    Pages are handed out in order from a pool of ``max_pages``; row b's i-th page is ``pages[b][i]``.
    """

    def __init__(self, batch: int, max_pages: int, device: torch.device) -> None:
        self.batch, self.max_pages, self.device = batch, max_pages, device
        self.pages: list[list[int]] = [[] for _ in range(batch)]
        self.length = 0
        self._next_free = 0

    def grow(self, count: int) -> None:
        """Make room for ``count`` more tokens in every row, taking new pages as needed."""
        needed = -(-(self.length + count) // PAGE_SIZE)  # pages per row
        for row in self.pages:
            while len(row) < needed:
                if self._next_free >= self.max_pages:
                    raise ValueError(f"the page pool ({self.max_pages} pages of {PAGE_SIZE}) is exhausted")
                row.append(self._next_free)
                self._next_free += 1
        self.length += count

    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashInfer's description: kv_indptr (B + 1,), kv_indices (total pages,), kv_last_page_len (B,), int32."""
        counts = torch.tensor([len(row) for row in self.pages], dtype=torch.int32)
        indptr = torch.cat((torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)))
        indices = torch.tensor([page for row in self.pages for page in row], dtype=torch.int32)
        last = self.length - (len(self.pages[0]) - 1) * PAGE_SIZE if self.length else 0
        last_len = torch.full((self.batch,), last, dtype=torch.int32)
        return indptr.to(self.device), indices.to(self.device), last_len.to(self.device)

    def append_coordinates(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """After :meth:`grow`: batch_indices (B * count,) and positions (B * count,) of the newest ``count`` tokens
        of each row, row-major, as ``flashinfer.get_batch_indices_positions`` gives them."""
        positions = torch.arange(self.length - count, self.length, dtype=torch.int32).repeat(self.batch)
        rows = torch.arange(self.batch, dtype=torch.int32).repeat_interleave(count)
        return rows.to(self.device), positions.to(self.device)

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Page and offset of every token, (B, length) each: the gather's indices."""
        position = torch.arange(self.length)
        table = torch.tensor(self.pages, dtype=torch.long).reshape(self.batch, -1)  # (B, pages per row)
        return table[:, position // PAGE_SIZE].to(self.device), (position % PAGE_SIZE).to(self.device)


def torch_append(key: torch.Tensor, value: torch.Tensor, batch_indices: torch.Tensor, positions: torch.Tensor,
                 pages: tuple[torch.Tensor, torch.Tensor], table: PageTable) -> None:
    """``flashinfer.append_paged_kv_cache`` in torch (NHD): token i goes to row ``batch_indices[i]``'s page
    ``positions[i] // PAGE_SIZE``, slot ``positions[i] % PAGE_SIZE``."""
    page_of_row = torch.tensor(table.pages, dtype=torch.long, device=key.device).reshape(table.batch, -1)
    page = page_of_row[batch_indices.long(), positions.long() // PAGE_SIZE]
    slot = positions.long() % PAGE_SIZE
    pages[0][page, slot] = key
    pages[1][page, slot] = value


def flashinfer_append(key: torch.Tensor, value: torch.Tensor, batch_indices: torch.Tensor, positions: torch.Tensor,
                      pages: tuple[torch.Tensor, torch.Tensor], table: PageTable) -> None:
    """FlashInfer's own kernel (CUDA)."""
    indptr, indices, last_len = table.csr()
    import_flashinfer().append_paged_kv_cache(key, value, batch_indices, positions, pages, indices, indptr, last_len,
                                              kv_layout="NHD")


def import_flashinfer() -> Any:
    return import_library("flashinfer", needs="flashinfer", install=INSTALL_HINT)


class FlashInferPagedCache:
    """Per layer, a pool of NHD pages (max_pages, PAGE_SIZE, Hkv, D) for keys and one for values, one page table
    shared by the layers; ``update`` appends through ``append`` and returns the row's pages gathered back."""

    def __init__(self, config: ModelConfig, append: Append) -> None:
        self.config, self.append = config, append
        self.max_pages = config.max_batch_size * -(-config.max_seq_len // PAGE_SIZE)
        self.reset()

    def reset(self) -> None:
        self.table: PageTable | None = None
        self.pages: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lengths: list[int] = []

    def _pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (self.max_pages, PAGE_SIZE, c.n_kv_heads, c.head_dim)
        return (torch.zeros(shape, dtype=c.dtype, device=c.device), torch.zeros(shape, dtype=c.dtype, device=c.device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, count, dim = key_states.shape  # (B, Hkv, S, D)
        if self.table is None:
            self.table = PageTable(batch, self.max_pages, key_states.device)
        if layer_idx == 0:
            self.table.grow(count)  # layer 0 comes first in every forward: the table grows once per forward
        if layer_idx == len(self.pages):
            self.pages.append(self._pool())
            self.lengths.append(0)
        rows, positions = self.table.append_coordinates(count)
        flat_keys = key_states.permute(0, 2, 1, 3).reshape(batch * count, heads, dim)  # (B*S, Hkv, D), row-major
        flat_values = value_states.permute(0, 2, 1, 3).reshape(batch * count, heads, dim)
        self.append(flat_keys, flat_values, rows, positions, self.pages[layer_idx], self.table)
        self.lengths[layer_idx] += count
        page, slot = self.table.slots()  # (B, S) each
        keys, values = self.pages[layer_idx]
        return keys[page, slot].permute(0, 2, 1, 3), values[page, slot].permute(0, 2, 1, 3)  # (B, Hkv, S, D)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0


def paged_kv_cache(config: ModelConfig) -> KVCache:
    """FlashInfer's paged cache, appended to by ``flashinfer.append_paged_kv_cache`` (CUDA only)."""
    import_flashinfer()
    return FlashInferPagedCache(config, flashinfer_append)


def paged_kv_cache_torch(config: ModelConfig) -> KVCache:
    """The same cache with :func:`torch_append`: the page-table bookkeeping and the gather, on any device."""
    return FlashInferPagedCache(config, torch_append)


paged_kv_cache.kvverify_declaration = CacheDeclaration(devices=("cuda",))  # type: ignore[attr-defined]
