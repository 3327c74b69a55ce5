"""Each built-in cache on hand-built updates whose contents can be written down.

Keys carry their own token index: key[b, h, t, 0] = 100 * b + 10 * h + t, values the negative, with
head_dim 1, so every expected tensor below is a list of numbers.
"""

from __future__ import annotations

import pytest
import torch

from kvverify import ContiguousCache, ModelConfig, PagedCache, SlidingWindowCache, StaticCache, capabilities
from kvverify.caches import BUILTIN_CACHES

CONFIG = ModelConfig(vocab_size=8, d_model=4, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=1, max_seq_len=8,
                     max_batch_size=2, positional="none")


def tokens(start: int, stop: int, batch: int = 2, heads: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, stop-start, 1) keys numbered by row, head and token; values are their negatives."""
    b = torch.arange(batch)[:, None, None]
    h = torch.arange(heads)[None, :, None]
    t = torch.arange(start, stop)[None, None, :]
    keys = (100 * b + 10 * h + t).float()[..., None]
    return keys, -keys


def write(cache: object, start: int, stop: int, layers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = tokens(start, stop)
    out = (k, v)
    for layer in range(layers):
        out = cache.update(k, v, layer, {"cache_position": torch.arange(start, stop)})  # type: ignore[attr-defined]
    return out


def token_ids(keys: torch.Tensor) -> list[int]:
    """The token indices held by row 0, head 0."""
    return [int(x) for x in keys[0, 0, :, 0]]


@pytest.mark.parametrize("name", sorted(BUILTIN_CACHES))
def test_every_cache_offers_every_optional_method(name: str) -> None:
    assert capabilities(BUILTIN_CACHES[name](CONFIG)) == {"crop", "reorder_cache", "reset"}


def test_contiguous_appends_and_returns_everything() -> None:
    cache = ContiguousCache()
    write(cache, 0, 3)
    keys, values = write(cache, 3, 4)
    assert token_ids(keys) == [0, 1, 2, 3]
    assert torch.equal(values, -keys)
    assert keys[1, 1, :, 0].tolist() == [110, 111, 112, 113]
    assert cache.get_seq_length() == cache.get_seq_length(1) == 4


def test_contiguous_crop_reorder_reset() -> None:
    cache = ContiguousCache()
    write(cache, 0, 5)
    cache.crop(-2)
    assert cache.get_seq_length() == 3
    cache.crop(10)  # longer than held: no-op
    assert cache.get_seq_length() == 3
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.keys[0][:, 0, :, 0].tolist() == [[100, 101, 102], [100, 101, 102]]
    cache.crop(0)
    assert cache.get_seq_length() == 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.keys == []


def test_static_writes_by_position_and_returns_the_whole_buffer() -> None:
    cache = StaticCache.from_config(CONFIG)
    write(cache, 0, 3)
    keys, _ = write(cache, 3, 4)
    assert keys.shape == (2, 2, 8, 1)  # max_seq_len slots; the model masks slots 4..7
    assert token_ids(keys) == [0, 1, 2, 3, 0, 0, 0, 0]
    assert cache.get_seq_length() == 4
    cache.crop(2)
    assert cache.get_seq_length() == 2 and token_ids(cache.keys[0]) == [0, 1, 0, 0, 0, 0, 0, 0]
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.keys[1].any()


def test_static_reorder_moves_keys_and_values() -> None:
    cache = StaticCache.from_config(CONFIG)
    write(cache, 0, 2)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.keys[1][:, 0, :2, 0].tolist() == [[100, 101], [0, 1]]
    assert torch.equal(cache.values[1], -cache.keys[1])


def test_paged_maps_tokens_through_the_block_table() -> None:
    cache = PagedCache.from_config(CONFIG, block_size=2)
    keys, values = write(cache, 0, 3)
    assert token_ids(keys) == [0, 1, 2]
    assert [len(t) for t in cache.block_tables] == [2, 2]  # 3 tokens -> 2 blocks per row
    keys, values = write(cache, 3, 5)
    assert token_ids(keys) == [0, 1, 2, 3, 4] and torch.equal(values, -keys)
    table = cache.block_tables[1]
    assert cache.key_pool[0][table[2], 1, 0, 0] == 114  # row 1, head 1, token 4: block 2, offset 0
    used = sum(len(t) for t in cache.block_tables)
    cache.crop(2)
    assert used == 6
    assert sum(len(t) for t in cache.block_tables) == 2 and len(cache.free_blocks) == 8 - 2
    cache.reorder_cache(torch.tensor([1, 1]))  # both rows now hold row 1's tokens, in separate blocks
    keys, _ = write(cache, 2, 3)
    assert keys[:, 0, :, 0].tolist() == [[100, 101, 2], [100, 101, 102]]


def test_paged_reset_returns_every_block() -> None:
    cache = PagedCache.from_config(CONFIG, block_size=2)
    write(cache, 0, 7)
    cache.reset()
    assert cache.get_seq_length() == 0 and len(cache.free_blocks) == 8  # 2 rows x 4 blocks of 2


def test_sliding_ring_returns_the_window_then_the_new_tokens() -> None:
    cache = SlidingWindowCache(window=3)
    keys, _ = write(cache, 0, 2)
    assert token_ids(keys) == [0, 1]
    keys, _ = write(cache, 2, 6)  # a chunk longer than the window: every query still sees its W-1 keys
    assert token_ids(keys) == [0, 1, 2, 3, 4, 5]
    keys, values = write(cache, 6, 7)
    assert token_ids(keys) == [3, 4, 5, 6] and torch.equal(values, -keys)
    assert cache.get_seq_length() == 7  # tokens seen, not tokens kept
    assert cache.keys[0].shape[-2] == 3  # memory stays at the window


def test_sliding_crop_refuses_after_eviction() -> None:
    cache = SlidingWindowCache(window=4)
    write(cache, 0, 3)
    cache.crop(2)
    assert token_ids(write(cache, 2, 3)[0]) == [0, 1, 2]
    write(cache, 3, 6)
    with pytest.raises(ValueError, match="evicted"):
        cache.crop(3)


def test_sliding_from_config_uses_the_model_window() -> None:
    assert SlidingWindowCache.from_config(CONFIG.replace(sliding_window=5)).window == 5
    assert SlidingWindowCache.from_config(CONFIG).window == CONFIG.max_seq_len
