"""torchtune's KVCache as a kvverify target: bitwise equal to recomputation with the batch it is set up for,
and the hazard that makes the batch a declaration: a smaller batch passes torchtune's check and comes back as
the buffer's batch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtune", reason="torchtune is not installed: pip install 'kvverify[torchtune]'",
                    exc_type=ImportError)

from kvverify.adapters import torchtune as tt
from kvverify.checks.loading import load_factory
from kvverify.checks.target import make_target
from kvverify.protocol.cache import declaration_of
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel
from kvverify.runs import CacheCheckFailed, check_cache

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                     max_batch_size=1, dtype=torch.float32)


def test_the_named_target_loads_and_declares_its_batch() -> None:
    factory = load_factory("kvverify.adapters.torchtune:kv_cache")
    assert declaration_of(factory).max_batch_size == tt.BATCH == 1
    assert make_target(factory).capabilities == frozenset({"reset"})  # torchtune has no crop, no reorder


def test_cached_equals_uncached_bit_for_bit() -> None:
    model = ReferenceModel(CONFIG, seed=0)
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(prompt, 12, use_cache=False)
    actual = model.generate(prompt, 12, cache=tt.kv_cache(CONFIG))
    assert torch.equal(expected.logits, actual.logits)


def test_suite_passes_on_a_few_examples() -> None:
    check_cache(tt.kv_cache, profile="dev", seed=0, max_examples=5,
                properties=["cached_equals_uncached", "chunked_prefill", "reset"])


def test_a_smaller_batch_comes_back_as_the_buffers_batch() -> None:
    cache = tt.setup_caches(CONFIG.replace(max_batch_size=4), batch_size=4)
    kv = torch.ones(1, CONFIG.n_kv_heads, 3, CONFIG.head_dim)
    keys, _ = cache.update(kv, kv, 0)  # accepted: torchtune refuses only a larger batch
    assert keys.shape[0] == 4  # and the buffer's batch comes back, every row written with the one row


def test_undeclared_batch_is_caught_by_the_contract() -> None:
    def undeclared(config: ModelConfig) -> tt.TorchtuneCache:
        return tt.setup_caches(config, batch_size=config.max_batch_size)

    with pytest.raises(CacheCheckFailed, match="batch"):
        check_cache(undeclared, profile="dev", seed=0, max_examples=20, properties=["cached_equals_uncached"])
