"""vLLM's prefix-cache block pool (``vllm.v1.core.block_pool.BlockPool``, pure Python) behind a small interface.

The pool hands out KV blocks by id, counts references, keeps full blocks findable by their prefix hash after
they are freed (until a later allocation reuses, that is evicts, them) and orders its free queue for eviction.
:class:`VllmBlockPool` speaks ids and hashes instead of vLLM's block objects, and drives the pool the way
vLLM's ``KVCacheManager`` does for one full-attention group: a prefix hit is the longest run of the request's
block hashes found in the cache (``get_cached_block`` until the first miss), shared by ``touch``; a request's
full blocks are registered with ``cache_full_blocks``; a finished request's blocks are freed tail first.

It is what :mod:`kvverify.adapters.vllm_pool_model` checks against a trivially correct model, and the block
allocator of :func:`paged_cache_block_pool`, vLLM's CPU write kernel with its blocks from vLLM's pool.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kvverify.adapters.vllm_kernels import BLOCK_SIZE, DTYPES, HEAD_DIMS, VllmPagedCache, import_vllm
from kvverify.protocol.cache import CacheDeclaration, KVCache
from kvverify.protocol.config import ModelConfig

GROUP = 0  # the one KV cache group


class VllmBlockPool:
    """``BlockPool(num_blocks, enable_caching=True, hash_block_size=block_size)``; block 0 is vLLM's null block,
    never handed out, so ``num_blocks - 1`` are usable."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.get_block_hash = import_vllm("vllm.v1.core.kv_cache_utils").get_block_hash  # no module kept: deepcopies
        pool_class = import_vllm("vllm.v1.core.block_pool").BlockPool
        self.pool: Any = pool_class(num_blocks, enable_caching=True, hash_block_size=block_size)
        self.block_size = block_size

    def _blocks(self, ids: list[int]) -> list[Any]:
        return [self.pool.blocks[i] for i in ids]

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks (ref count 1), evicting any hash they held; ValueError when too few are free."""
        return [block.block_id for block in self.pool.get_new_blocks(count)]

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block, first to evict first (vLLM frees a request's blocks tail first)."""
        self.pool.free_blocks(self._blocks(blocks))

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The prefix hit: the cached blocks of the longest run of ``hashes`` from the first."""
        hit: list[int] = []
        for block_hash in hashes:
            found = self.pool.get_cached_block(block_hash, [GROUP])
            if found is None:
                break
            hit.append(found[0].block_id)
        return hit

    def touch(self, blocks: list[int]) -> None:
        """Share blocks (a prefix hit): one more reference each; a free one leaves the free queue."""
        self.pool.touch(self._blocks(blocks))

    def cache(self, hashes: list[bytes], blocks: list[int], already_cached: int) -> None:
        """Register a request's full blocks: ``blocks[i]`` holds the prefix whose hash is ``hashes[i]``."""
        request = SimpleNamespace(block_hashes=hashes)  # all cache_full_blocks reads of a request without events
        self.pool.cache_full_blocks(request, self._blocks(blocks), already_cached, len(blocks), self.block_size,
                                    GROUP)

    def evict(self, blocks: set[int]) -> None:
        """Forget these blocks' hashes (a KV connector's eviction); references are unchanged."""
        self.pool.evict_blocks(blocks)

    def reset_prefix_cache(self) -> bool:
        """Forget every hash, if no block is in use; whether it did."""
        return bool(self.pool.reset_prefix_cache())

    # What the pool holds, for the model to compare.
    def ref_counts(self) -> dict[int, int]:
        return {block.block_id: block.ref_cnt for block in self.pool.blocks if not block.is_null}

    def free_order(self) -> list[int]:
        """The free queue, the next block to hand out first."""
        return [block.block_id for block in self.pool.free_block_queue.get_all_free_blocks()]

    def num_free(self) -> int:
        return int(self.pool.get_num_free_blocks())

    def cached(self) -> dict[bytes, set[int]]:
        """Every hash the pool can hit, with the blocks holding it."""
        held: dict[bytes, set[int]] = {}
        for block in self.pool.blocks:
            if block.block_hash is not None:
                held.setdefault(bytes(self.get_block_hash(block.block_hash)), set()).add(block.block_id)
        return held


class PoolBlocks:
    """vLLM's pool as a :class:`~kvverify.adapters.vllm_kernels.Blocks` allocator: a row's blocks are freed
    tail first, as vLLM frees a request's."""

    def __init__(self, pool: VllmBlockPool) -> None:
        self.pool = pool

    def allocate(self, count: int) -> list[int]:
        return self.pool.allocate(count)

    def free(self, blocks: list[int]) -> None:
        self.pool.free(blocks[::-1])


def paged_cache_block_pool(config: ModelConfig) -> KVCache:
    """vLLM's CPU write kernel (model dtype, blocks of :data:`BLOCK_SIZE`) with its blocks allocated and freed
    by vLLM's ``BlockPool`` (one more block than the cache needs: vLLM's null block)."""
    blocks_needed = config.max_batch_size * -(-config.max_seq_len // BLOCK_SIZE)
    pool = VllmBlockPool(blocks_needed + 1, BLOCK_SIZE)
    return VllmPagedCache(config, kv_cache_dtype="auto", blocks=PoolBlocks(pool),
                          num_blocks=blocks_needed + 1)


paged_cache_block_pool.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    block_size=BLOCK_SIZE, head_dims=HEAD_DIMS, dtypes=DTYPES)
