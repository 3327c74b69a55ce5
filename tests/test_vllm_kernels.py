"""vLLM's CPU paged write kernel through kvverify.adapters.vllm_kernels: writes read back bitwise, the layout read
from the kernel, the fp8 store's rounding, and the cache on vLLM's block pool. Needs vLLM (tox -e lib-vllm)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm._custom_ops", reason="vLLM's CPU build: tox -e lib-vllm")

from kvverify.adapters import vllm_kernels as vk
from kvverify.adapters.vllm_block_pool import paged_cache_block_pool
from kvverify.adapters.vllm_layout import read_layout
from kvverify.protocol.config import ModelConfig

backend = pytest.importorskip("vllm.v1.attention.backends.cpu_attn").CPUAttentionBackend
needs_fp8 = pytest.mark.skipif(not vk.fp8_supported(), reason="vLLM's fp8 KV needs AVX-512 or AMX")


def config(dtype: torch.dtype, head_dim: int, batch: int = 2) -> ModelConfig:
    return ModelConfig(d_model=4 * head_dim, n_heads=4, n_kv_heads=2, head_dim=head_dim, dtype=dtype,
                       max_seq_len=100, max_batch_size=batch)


def appends(cache: vk.VllmPagedCache, cfg: ModelConfig, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Append chunks of random keys and values to layer 0; what was appended, (B, Hkv, sum(counts), D) each."""
    generator = torch.Generator().manual_seed(0)
    keys, values = [], []
    for count in counts:
        shape = (cfg.max_batch_size, cfg.n_kv_heads, count, cfg.head_dim)
        keys.append(torch.randn(shape, generator=generator).to(cfg.dtype))
        values.append(torch.randn(shape, generator=generator).to(cfg.dtype))
        cache.update(keys[-1], values[-1], 0)
    return torch.cat(keys, 2), torch.cat(values, 2)


@pytest.mark.parametrize("dtype", vk.DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_writes_read_back_bitwise(dtype: torch.dtype, head_dim: int) -> None:
    cfg = config(dtype, head_dim)
    cache = vk.VllmPagedCache(cfg, kv_cache_dtype="auto")
    keys, values = appends(cache, cfg, [5, 1, 40, 1, 30])  # 77 tokens: 3 blocks of 32 per row
    got_keys, got_values = cache._gather(0, torch.tensor(cache.table))
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    cache.crop(50)
    assert [len(row) for row in cache.table] == [2, 2] and cache.get_seq_length() == 50
    got_keys, _ = cache.update(keys[:, :, :3], values[:, :, :3], 0)
    assert torch.equal(got_keys[:, :, :50], keys[:, :, :50]) and torch.equal(got_keys[:, :, 50:], keys[:, :, :3])


def test_the_vec_layout_stores_keys_transposed() -> None:
    """What the probe reads for isa vec: per head, keys (head_dim, block) then values (block, head_dim)."""
    cache = vk.VllmPagedCache(config(torch.bfloat16, 32), kv_cache_dtype="auto")
    assert cache.isa == "vec"
    heads, block, dim = cache.layout.keys.shape
    h, t, d = torch.meshgrid(torch.arange(heads), torch.arange(block), torch.arange(dim), indexing="ij")
    assert torch.equal(cache.layout.keys, h * block * 2 * dim + d * block + t)
    assert torch.equal(cache.layout.values, h * block * 2 * dim + block * dim + t * dim + d)


def test_a_write_that_drops_a_token_is_refused() -> None:
    cache = vk.VllmPagedCache(config(torch.float32, 32), kv_cache_dtype="auto")

    def dropping(key: torch.Tensor, value: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 slots: torch.Tensor) -> None:
        cache._write(key[:-1].contiguous(), value[:-1].contiguous(), kc, vc, slots[:-1])

    with pytest.raises(ValueError, match="not one each: the layout cannot be read"):
        read_layout(dropping, isa="vec", heads=2, block_size=32, head_dim=32, dtype=torch.float32,
                    storage_dtype=torch.float32, as_float=lambda t: t.float())


def test_declared_shapes_are_vllms() -> None:
    assert set(vk.DTYPES) == set(backend.supported_dtypes)
    assert set(vk.HEAD_DIMS) <= set(backend.get_supported_head_sizes())
    assert all(vk.BLOCK_SIZE % size.base == 0 for size in backend.get_supported_kernel_block_sizes())


@needs_fp8
@pytest.mark.parametrize("dtype", vk.DTYPES)
def test_fp8_store_rounds_toward_zero(dtype: torch.dtype) -> None:
    """The kernel's fp8 (e4m3, scale 1) equals fp8_round_trip bitwise, and is not torch's round-to-nearest."""
    cfg = config(dtype, 64)
    cache = vk.VllmPagedCache(cfg, kv_cache_dtype="fp8")
    keys, values = appends(cache, cfg, [33, 7])
    got_keys, got_values = cache._gather(0, torch.tensor(cache.table))
    replay = {"positions": torch.arange(40), "layer": 0, "is_key": True, "requantize": False}
    assert torch.equal(got_keys, vk.fp8_round_trip(keys, **replay))
    assert torch.equal(got_values, vk.fp8_round_trip(values, **replay))
    nearest = keys.float().to(torch.float8_e4m3fn).float().to(dtype)
    assert (got_keys != nearest).float().mean() > 0.2
    assert (got_keys.float().abs() <= keys.float().abs()).all()  # toward zero: never larger in magnitude


def test_fp8_toward_zero_saturates_and_steps_down() -> None:
    x = torch.tensor([2.43, -2.43, 1000.0, -1000.0, 2.25, 0.0])
    assert vk.fp8_toward_zero(x).float().tolist() == [2.25, -2.25, 448.0, -448.0, 2.25, 0.0]


def test_fork_and_block_pool() -> None:
    """The cache deep-copies (the suite forks it); on vLLM's pool, crop and reset give blocks back."""
    cfg = config(torch.float16, 32)
    cache = paged_cache_block_pool(cfg)
    assert isinstance(cache, vk.VllmPagedCache)
    pool = cache.blocks.pool  # type: ignore[attr-defined]
    free = pool.num_free()
    keys, _ = appends(cache, cfg, [70])
    assert pool.num_free() == free - 6 and all(0 not in row for row in cache.table)  # 3 a row, no null block
    fork = copy.deepcopy(cache)
    assert torch.equal(fork._gather(0, torch.tensor(fork.table))[0], keys)
    cache.crop(32)
    assert pool.num_free() == free - 2
    cache.reset()
    assert pool.num_free() == free and pool.ref_counts() == dict.fromkeys(pool.ref_counts(), 0)
