"""Paged caches with a block-table bug each (parent: :class:`~kvverify.caches.PagedCache`)."""

from __future__ import annotations

import torch

from kvverify.caches import PagedCache
from kvverify.protocol.cache import resolve_crop


class ReorderSharesBlocks(PagedCache):
    """transformers #48700 in a paged layout (the reorder reaches the block table but not the blocks): beams
    that duplicate a row share its blocks without copy-on-write, so once they diverge inside a partly filled
    block each one overwrites the other's newest tokens."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.block_tables:
            self.block_tables = [list(self.block_tables[row]) for row in beam_idx.tolist()]


class CropFreesPartialBlock(PagedCache):
    """transformers #47433 in a paged layout: ``crop`` frees ``keep // block_size`` blocks' worth of the table
    instead of rounding up, so a partly kept block goes back to the pool and is handed to another row. With
    one row the same block comes straight back and nothing shows; with two rows they swap blocks."""

    def crop(self, max_length: int) -> None:
        keep = resolve_crop(max_length, self.get_seq_length())
        self.lengths = [min(length, keep) for length in self.lengths]
        needed = max(self.lengths) // self.block_size  # should round up
        for table in self.block_tables:
            while len(table) > needed:
                self.free_blocks.append(table.pop())


class BlockIndexOffByOne(PagedCache):
    """flash-attention #772 (a write landing in the wrong place), as a block-table off-by-one: a token's block
    is looked up as ``(position - 1) // block_size``. Reads and writes agree, and token 0 lands in the table's
    last block (index -1), so nothing shows until the table next grows by a block and token 0 is looked up
    in the new, unwritten one."""

    def _locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(self.block_tables, dtype=torch.long, device=positions.device)
        return table[:, (positions - 1) // self.block_size], positions % self.block_size
