"""vLLM's prefix-cache block pool against the trivially correct model (kvverify.adapters.vllm_pool_model), and
two pools with a planted bug each, which the same programs must catch. Needs vLLM (tox -e lib-vllm)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

pytest.importorskip("vllm.v1.core.block_pool", reason="vLLM's CPU build: tox -e lib-vllm")

from kvverify.adapters.vllm_block_pool import VllmBlockPool
from kvverify.adapters.vllm_pool_model import PoolModel, pool_machine, prefix_hashes

PROGRAMS = settings(max_examples=150, stateful_step_count=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow], database=None,
                    report_multiple_bugs=False)


class TouchKeepsFreeBlockQueued(VllmBlockPool):
    """Planted bug: sharing a free cached block adds a reference but leaves it in the free queue, so the next
    allocation can hand out a block another request is reading."""

    def touch(self, blocks: list[int]) -> None:
        for block in blocks:
            self.pool.blocks[block].ref_cnt += 1


class EvictsNewestFirst(VllmBlockPool):
    """Planted bug: freed cached blocks go to the front of the free queue (most recently used evicted first)."""

    def free(self, blocks: list[int]) -> None:
        super().free(blocks)
        queue = self.pool.free_block_queue
        freed = [self.pool.blocks[b] for b in blocks if self.pool.blocks[b].ref_cnt == 0
                 and self.pool.blocks[b].block_hash is not None]
        for block in freed:
            queue.remove(block)
        queue.prepend_n(freed)


def test_vllm_block_pool_agrees_with_the_model() -> None:
    run_state_machine_as_test(pool_machine(VllmBlockPool), settings=PROGRAMS)


@pytest.mark.parametrize("planted", [TouchKeepsFreeBlockQueued, EvictsNewestFirst])
def test_a_planted_bug_is_caught(planted: type[VllmBlockPool]) -> None:
    with pytest.raises(AssertionError):  # the model's checks, or one of vLLM's own asserts, whichever fires first
        run_state_machine_as_test(pool_machine(planted), settings=PROGRAMS)


def test_the_model_by_hand() -> None:
    """One program spelled out: a shared prefix, its eviction order after both requests finish, and a reuse."""
    model = PoolModel(5)
    first = prefix_hashes(["a", "b"])
    model.cache(first, model.allocate(2), 0)  # blocks 1, 2
    hit = model.lookup(prefix_hashes(["a", "a"]))
    assert hit == [1]
    model.touch(hit)
    model.cache(prefix_hashes(["a", "a"]), hit + model.allocate(1), 1)  # block 3
    assert model.refs == {1: 2, 2: 1, 3: 1, 4: 0} and model.queue == [4]
    model.free([3, 1])
    model.free([2, 1])
    assert model.queue == [4, 3, 2, 1]  # cached blocks at the back, the most recently freed last
    assert model.allocate(2) == [4, 3] and b"aa" not in model.cached
    assert model.lookup(prefix_hashes(["a", "b", "b"])) == [1, 2]
    assert not model.reset_prefix_cache()
