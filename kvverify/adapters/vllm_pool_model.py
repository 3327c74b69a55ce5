"""vLLM's prefix-cache block pool against a trivially correct model, in programs Hypothesis writes.

:class:`PoolModel` is the pool as a few dicts and one list: a reference count per block, the free queue in
eviction order, and which blocks hold which prefix hash. Its rules are the ones ``BlockPool`` documents:

- allocating takes blocks from the front of the free queue, evicting whatever hash they held;
- a prefix hit is the longest run of a request's hashes that are cached, each served by the block that has
  held it longest; sharing a block (a hit) adds a reference and takes it out of the free queue;
- freeing drops one reference; a block at zero goes to the *front* of the queue when it holds no hash (reused
  first) and to the *back* when it does (kept for later hits, evicted least recently freed first);
- evicting forgets hashes only; resetting the prefix cache forgets every hash, and only when no block is in use.

:func:`pool_machine` builds a ``RuleBasedStateMachine`` that starts requests (a chain of block contents drawn
from a two-letter alphabet, so that requests share prefixes, lose them to eviction and recache them twice),
finishes them, evicts blocks, asks for too many blocks and resets the cache, on the pool and the model alike,
and checks after every step that the reference counts, the free queue (order included) and the cached hashes
agree. Any pool with :class:`VllmBlockPool`'s methods can be driven; ``tests/test_vllm_block_pool.py`` drives
vLLM's, and two pools with a planted bug each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

#: Blocks in the pool (block 0 is vLLM's null block: NUM_BLOCKS - 1 are handed out); small, so that requests
#: compete for them and cached blocks are evicted.
NUM_BLOCKS = 8
BLOCK_SIZE = 16


def prefix_hashes(contents: list[str]) -> list[bytes]:
    """The hash of each full block: its whole prefix (two requests share block i iff they share blocks 0..i)."""
    return ["".join(contents[:i + 1]).encode() for i in range(len(contents))]


class PoolModel:
    """The pool, trivially: refs[b], the free queue (next to hand out first), and hash -> blocks (oldest first)."""

    def __init__(self, num_blocks: int) -> None:
        self.refs = {block: 0 for block in range(1, num_blocks)}
        self.queue = list(range(1, num_blocks))
        self.cached: dict[bytes, list[int]] = {}
        self.hash_of: dict[int, bytes] = {}

    def _forget(self, block: int) -> None:
        block_hash = self.hash_of.pop(block, None)
        if block_hash is not None:
            self.cached[block_hash].remove(block)
            if not self.cached[block_hash]:
                del self.cached[block_hash]

    def lookup(self, hashes: list[bytes]) -> list[int]:
        hit = []
        for block_hash in hashes:
            if block_hash not in self.cached:
                break
            hit.append(self.cached[block_hash][0])
        return hit

    def free_after_touch(self, blocks: list[int]) -> int:
        return len(self.queue) - sum(self.refs[block] == 0 for block in set(blocks))

    def touch(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                self.queue.remove(block)
            self.refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        taken, self.queue = self.queue[:count], self.queue[count:]
        for block in taken:
            self._forget(block)
            self.refs[block] = 1
        return taken

    def cache(self, hashes: list[bytes], blocks: list[int], already_cached: int) -> None:
        for block_hash, block in list(zip(hashes, blocks, strict=True))[already_cached:]:
            self.hash_of[block] = block_hash
            self.cached.setdefault(block_hash, []).append(block)

    def free(self, blocks: list[int]) -> None:
        first: list[int] = []
        last: list[int] = []
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                (last if block in self.hash_of else first).append(block)
        self.queue = first + self.queue + last

    def evict(self, blocks: set[int]) -> None:
        for block in blocks:
            self._forget(block)

    def reset_prefix_cache(self) -> bool:
        if any(self.refs.values()):
            return False
        self.cached.clear()
        self.hash_of.clear()
        return True

    def cached_sets(self) -> dict[bytes, set[int]]:
        return {block_hash: set(blocks) for block_hash, blocks in self.cached.items()}


def pool_machine(make_pool: Callable[[int, int], Any]) -> type[RuleBasedStateMachine]:
    """A state machine driving ``make_pool(NUM_BLOCKS, BLOCK_SIZE)`` and a :class:`PoolModel` side by side."""

    class BlockPoolMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.pool = make_pool(NUM_BLOCKS, BLOCK_SIZE)
            self.model = PoolModel(NUM_BLOCKS)
            self.live: list[list[int]] = []  # each running request's blocks, in order

        @rule(contents=st.lists(st.sampled_from("ab"), min_size=1, max_size=4))
        def start_request(self, contents: list[str]) -> None:
            hashes = prefix_hashes(contents)
            hit = self.pool.lookup(hashes)
            expected = self.model.lookup(hashes)
            assert hit == expected, f"prefix hit for {''.join(contents)!r}: pool {hit}, model {expected}"
            need = len(hashes) - len(hit)
            if need > self.model.free_after_touch(hit):
                return  # the scheduler would not admit it now
            self.pool.touch(hit)
            self.model.touch(hit)
            new, predicted = self.pool.allocate(need), self.model.allocate(need)
            assert new == predicted, f"allocated {new}, the free queue's front was {predicted}"
            self.pool.cache(hashes, hit + new, len(hit))
            self.model.cache(hashes, hit + new, len(hit))
            self.live.append(hit + new)

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def finish_request(self, data: st.DataObject) -> None:
            blocks = self.live.pop(data.draw(st.integers(0, len(self.live) - 1), label="request"))
            self.pool.free(blocks[::-1])  # tail first, as vLLM's KVCacheManager frees
            self.model.free(blocks[::-1])

        @rule(blocks=st.sets(st.integers(1, NUM_BLOCKS - 1), max_size=3))
        def evict(self, blocks: set[int]) -> None:
            self.pool.evict(blocks)
            self.model.evict(blocks)

        @rule(extra=st.integers(1, 3))
        def allocate_too_many(self, extra: int) -> None:
            count = len(self.model.queue) + extra
            try:
                self.pool.allocate(count)
            except ValueError:
                return
            raise AssertionError(f"allocating {count} blocks with {len(self.model.queue)} free did not raise")

        @rule()
        def reset_prefix_cache(self) -> None:
            done, expected = self.pool.reset_prefix_cache(), self.model.reset_prefix_cache()
            assert done == expected, f"reset_prefix_cache returned {done} with refs {self.model.refs}"

        @invariant()
        def agrees_with_model(self) -> None:
            assert self.pool.ref_counts() == self.model.refs, (
                f"reference counts: pool {self.pool.ref_counts()}, model {self.model.refs}")
            assert self.pool.free_order() == self.model.queue, (
                f"free queue (next first): pool {self.pool.free_order()}, model {self.model.queue}")
            assert self.pool.num_free() == len(self.model.queue), (
                f"free blocks: pool says {self.pool.num_free()}, its queue holds {len(self.model.queue)}")
            assert self.pool.cached() == self.model.cached_sets(), (
                f"cached hashes: pool {self.pool.cached()}, model {self.model.cached_sets()}")

    return BlockPoolMachine
