"""Where vLLM's CPU paged write kernel puts each key and value inside a block, read from the kernel itself.

vLLM's CPU attention backend keeps, per layer, one tensor ``(num_blocks, n_kv_heads, block_size, 2 * head_dim)``
(``CPUAttentionBackend.supported_kv_cache_layouts()``: ``LBHNC``) and hands its kernels the two halves of the
view ``(num_blocks, n_kv_heads, 2 * block_size, head_dim)``. How the elements are ordered *inside* a block
depends on the ``isa`` argument of ``cpu_attn_reshape_and_cache`` (``vec`` and ``vec16`` store a head's keys
transposed, ``(head_dim, block_size)``, and its values as written; ``amx`` packs differently), and is nowhere in
vLLM's Python. So :func:`read_layout` asks the kernel: it writes tokens whose elements are the base-8 digits of
their own logical index (``(head, slot, dim)``) into a one-block scratch cache, one digit per write, and reads
back where each index landed. Digits 1 to 8 are exact in every KV dtype the kernel stores, fp8 e4m3 and e5m2
included, so the same probe reads the fp8 layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: write(key (T, Hkv, D), value, key_cache, value_cache, slot_mapping (T,)) -> None: the kernel, isa bound.
Write = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

BASE = 8  # digits 1..BASE are exact in float8_e5m2 (2 mantissa bits) and every wider format


@dataclass(frozen=True)
class BlockLayout:
    """Where the kernel stores a block's tokens: ``keys[h, t, d]`` and ``values[h, t, d]`` are offsets into one
    block's storage flattened, ``(n_kv_heads * block_size * 2 * head_dim,)``. Each is (Hkv, block_size, D) long."""

    isa: str
    keys: torch.Tensor
    values: torch.Tensor


def block_views(storage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's own split of a layer's storage (num_blocks, Hkv, block, 2D) into the key and value caches the
    kernel takes, each (num_blocks, Hkv, block, D), as ``CPUAttentionBackendImpl.do_kv_cache_update`` makes them."""
    num_blocks, heads, block, _ = storage.shape
    key_cache, value_cache = storage.view(num_blocks, heads, block * 2, -1).chunk(2, dim=2)
    return key_cache, value_cache


def _digits(total: int) -> int:
    count = 1
    while BASE**count < total:
        count += 1
    return count


def read_layout(write: Write, *, isa: str, heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                storage_dtype: torch.dtype, as_float: Callable[[torch.Tensor], torch.Tensor]) -> BlockLayout:
    """The kernel's placement of keys and values in a block, for this isa, shape and dtype.

    dtype: what the model writes; storage_dtype: what the cache holds (uint8 for fp8); as_float: the stored
    elements as float32 (fp8 viewed as its format). Raises ValueError when the writes do not land as one
    position per element (the kernel overwrote, dropped or duplicated something).
    """
    total = heads * block_size * head_dim
    logical = torch.arange(total).reshape(heads, block_size, head_dim).permute(1, 0, 2)  # (T, Hkv, D)
    storage = torch.zeros(1, heads, block_size, 2 * head_dim, dtype=storage_dtype)
    key_cache, value_cache = block_views(storage)
    slots = torch.arange(block_size, dtype=torch.long)

    def written(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # the block's storage, (Hkv*block*2D,)
        storage.zero_()
        write(key.to(dtype).contiguous(), value.to(dtype).contiguous(), key_cache, value_cache, slots)
        return as_float(storage).reshape(-1).clone()  # as_float may return the storage itself

    which = written(torch.ones(logical.shape), torch.full(logical.shape, 2.0))  # 1: a key's place, 2: a value's
    index = torch.zeros(which.shape, dtype=torch.long)
    for digit in range(_digits(total)):
        values = ((logical // BASE**digit) % BASE + 1).float()
        index += (written(values, values) - 1).round().long() * BASE**digit
    layout = {}
    for name, mark in (("keys", 1.0), ("values", 2.0)):
        places = (which == mark).nonzero().squeeze(1)
        found = index[places]
        if places.numel() != total or not torch.equal(found.sort().values, torch.arange(total)):
            raise ValueError(
                f"vLLM's cpu_attn_reshape_and_cache (isa {isa!r}, {dtype}, {heads} KV heads, block {block_size}, "
                f"head_dim {head_dim}) wrote {places.numel()} {name} positions for {total} elements, not one each: "
                "the layout cannot be read, so the adapter cannot gather the cache back. Check that this isa "
                "supports the shape (vLLM's _get_attn_isa chooses it) or report it to vLLM.")
        offsets = torch.empty(total, dtype=torch.long)
        offsets[found] = places
        layout[name] = offsets.reshape(heads, block_size, head_dim)  # (Hkv, block, D)
    return BlockLayout(isa, layout["keys"], layout["values"])
