"""mistral-inference's BufferCache as a kvverify target: bitwise equal to recomputation with a sliding window, a
prompt longer than the window, a prompt fed in chunks past it and decoding past it, its ring unrotated oldest
first."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mistral_inference.cache", reason="mistral-inference is not installed: tox -e lib-mistral",
                    exc_type=ImportError)

from kvverify.adapters import mistral as mi
from kvverify.checks.loading import load_factory
from kvverify.checks.target import make_target
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel
from kvverify.runs import check_cache

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                     max_batch_size=2, dtype=torch.float64, sliding_window=4)


def _prompt(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def test_the_named_target_loads_with_what_mistral_offers() -> None:
    target = make_target(load_factory("kvverify.adapters.mistral:buffer_cache"))
    assert target.capabilities == frozenset({"reset"})  # BufferCache has no crop, no reorder


@pytest.mark.parametrize("prompt_length", [3, 6])  # within the window, and past it in the first prefill
def test_decoding_past_the_window_equals_uncached_bit_for_bit(prompt_length: int) -> None:
    model = ReferenceModel(CONFIG, seed=0)
    prompt = _prompt(prompt_length)
    expected = model.generate(prompt, 12, use_cache=False)
    actual = model.generate(prompt, 12, cache=mi.buffer_cache(CONFIG))
    assert torch.equal(expected.logits, actual.logits), "BufferCache differs from recomputation"


@pytest.mark.parametrize("chunks", [(4, 4, 4), (3, 3, 3, 3), (2,) * 6, (1, 3, 5, 3)])
def test_a_prompt_fed_in_chunks_past_the_window_equals_uncached(chunks: tuple[int, ...]) -> None:
    model = ReferenceModel(CONFIG, seed=0)
    prompt = _prompt(sum(chunks))
    cache, start, logits = mi.buffer_cache(CONFIG), 0, []
    for size in chunks:
        logits.append(model(prompt[:, start:start + size], cache=cache, start=start))
        start += size
    assert cache.get_seq_length() == start
    assert torch.equal(torch.cat(logits, dim=1), model(prompt)), f"chunks {list(chunks)} differ from one prefill"


def test_a_wrapped_ring_comes_back_oldest_first() -> None:
    cache = mi.buffer_cache(CONFIG.replace(n_layers=1))
    for position in range(7):  # token p's keys are all p: after 7 tokens the ring holds 3, 4, 5, 6
        states = torch.full((1, CONFIG.n_kv_heads, 1, CONFIG.head_dim), float(position), dtype=torch.float64)
        keys, _ = cache.update(states, states, 0)
    assert keys[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0], "the ring's slots are not unrotated oldest first"
    assert cache.get_seq_length() == 7


def test_suite_passes_on_a_few_examples() -> None:
    check_cache(mi.buffer_cache, profile="dev", seed=0, max_examples=5,
                properties=["cached_equals_uncached", "chunked_prefill", "sliding_window", "stateful"])
