"""Heads, layers, dtypes and memory layout, one planted bug each (parents: the contiguous and static caches)."""

from __future__ import annotations

from typing import Any

import torch

from kvverify.caches import ContiguousCache, StaticCache
from kvverify.protocol.config import ModelConfig


class RepeatsHeadsBeforeCaching(ContiguousCache):
    """SnapKV #16, lingua #44, torchtune #38: grouped-query heads are repeated before caching, so the cache
    holds ``n_heads`` copies instead of ``n_kv_heads`` (n_rep times the memory). The logits are unchanged;
    only the returned shape, against the protocol's ``(batch, n_kv_heads, seq, head_dim)``, or the memory,
    shows it."""

    def __init__(self, n_rep: int = 1) -> None:
        super().__init__()
        self.n_rep = n_rep

    @classmethod
    def from_config(cls, config: ModelConfig) -> RepeatsHeadsBeforeCaching:
        return cls(config.n_rep)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        repeat = self.n_rep
        return super().update(
            key_states.repeat_interleave(repeat, 1), value_states.repeat_interleave(repeat, 1), layer_idx, cache_kwargs
        )


class TilesHeadGroups(RepeatsHeadsBeforeCaching):
    """axlearn #842: the grouped-query mapping changes from interleave (query head h reads KV head
    h // n_rep) to tile (h % n_kv_heads). Needs n_kv_heads > 1 and n_rep > 1: with MQA or MHA the two agree."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tile = (1, self.n_rep, 1, 1)
        return ContiguousCache.update(self, key_states.repeat(tile), value_states.repeat(tile), layer_idx, cache_kwargs)


class ReadsLayerModTwo(ContiguousCache):
    """A layer reading another layer's cache (per-layer state mixed up between layers, as in fla #477): each
    layer writes its own entry but reads entry ``layer_idx % 2``, right for two-layer models and wrong from
    layer 2 on."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        super().update(key_states, value_states, layer_idx, cache_kwargs)
        return self.keys[layer_idx % 2], self.values[layer_idx % 2]


class KeysAsValues(ContiguousCache):
    """ik_llama.cpp #1592: the K cache is handed back as the V cache."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, _ = super().update(key_states, value_states, layer_idx, cache_kwargs)
        return keys, keys


class LayoutReadAsOld(ContiguousCache):
    """LMCache #4463: the producer's layout changed and the consumer reads with the old one; here the
    (batch, heads, seq, dim) store is read back as if it were (batch, seq, heads, dim). With one KV head or
    one token the two layouts coincide."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        batch, heads, seq, dim = keys.shape
        return (
            keys.reshape(batch, seq, heads, dim).transpose(1, 2),
            values.reshape(batch, seq, heads, dim).transpose(1, 2),
        )


class GrowCopyOneElementShort(ContiguousCache):
    """executorch #5227's off-by-one at capacity, in a buffer that doubles when full (16, 32, 64... tokens):
    the copy into the grown buffer moves ``numel - 1`` elements, so the last element of the flattened key
    buffer (last row, last head, newest token, last dim) becomes zero. One element of one key, and only when
    a full buffer grows: a chunk that crosses a power of two from a part-filled buffer loses an unwritten one."""

    first_capacity = 16

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        before = self.get_seq_length(layer_idx)
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if before >= self.first_capacity and before & (before - 1) == 0:  # a full buffer of 2^k tokens grew
            keys[-1, -1, before - 1, -1] = 0
        return keys, values


class WrongBatchRow(StaticCache):
    """flash-attention #772: the write lands in the wrong batch row; here row b of the update is written to
    row ``batch - 1 - b`` (the row stride counted from the other end). Invisible with one row."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states.flip(0), value_states.flip(0), layer_idx, cache_kwargs)


class _StoredAs(StaticCache):
    """A static cache whose buffers are allocated in ``storage`` rather than the model's dtype."""

    storage: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> StaticCache:
        return super().from_config(config, dtype=cls.storage)


class DowncastToBfloat16(_StoredAs):
    """TransformerLens #1260: the cache is allocated in another dtype than the model's; here bfloat16,
    written with a cast and read back cast to the model's dtype. Silent, and lossy for float32 and float16."""

    storage = torch.bfloat16

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(
            key_states.to(self.storage), value_states.to(self.storage), layer_idx, cache_kwargs
        )
        return keys.to(key_states.dtype), values.to(value_states.dtype)


class PromotedToFloat32(_StoredAs):
    """torchtune #398: the cache is allocated in the default dtype (float32) and returned as is, so a float16
    or bfloat16 model's attention is promoted to float32. Invisible for a float32 model."""

    storage = torch.float32

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states.to(self.storage), value_states.to(self.storage), layer_idx, cache_kwargs)


class Bfloat16BitsReadAsFloat16(_StoredAs):
    """vLLM #54338: a float16 cache holding bfloat16 bits, read back as float16: fluent nonsense, no error."""

    storage = torch.float16

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def as_bits(x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.bfloat16).view(torch.float16)

        keys, values = super().update(as_bits(key_states), as_bits(value_states), layer_idx, cache_kwargs)
        return keys.to(key_states.dtype), values.to(value_states.dtype)


class GrowsByReallocating(StaticCache):
    """ik_llama.cpp #2096: a captured CUDA graph replayed after the KV buffers it reads changed under it. Here
    the buffer starts at ``chunk`` slots and, when a write passes its end, an eager allocator (outside any graph)
    reallocates it ``chunk`` slots larger and copies it over. Eager decoding is right; under
    ``torch.compile(dynamic=False)`` every growth is a new shape and a recompile, and a CUDA graph captured
    before a growth keeps reading the old buffer."""

    chunk = 2
    limit = 0  # the largest buffer (max_seq_len), set when the first update shrinks the buffers to one chunk

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _make_room(self, layer_idx, key_states.shape[2], cache_kwargs)
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _make_room(cache: GrowsByReallocating, layer_idx: int, count: int, cache_kwargs: dict[str, Any] | None) -> None:
    """Grow ``cache``'s buffers of ``layer_idx`` by whole chunks until the write fits (at most to max_seq_len)."""
    if not cache.limit:  # start small: give back what the constructor allocated
        cache.limit = cache.keys[0].shape[2]
        cache.keys = [k[:, :, : cache.chunk].clone() for k in cache.keys]
        cache.values = [v[:, :, : cache.chunk].clone() for v in cache.values]
    position = (cache_kwargs or {}).get("cache_position")
    end = cache.lengths[layer_idx] + count if position is None else int(position.max()) + 1
    while end > cache.keys[layer_idx].shape[2] < cache.limit:
        grown = min(cache.keys[layer_idx].shape[2] + cache.chunk, cache.limit)
        for buffers in (cache.keys, cache.values):
            old = buffers[layer_idx]
            buffers[layer_idx] = torch.cat((old, old.new_zeros(*old.shape[:2], grown - old.shape[2], old.shape[3])), 2)


class LengthAsPythonInt(StaticCache):
    """torchtune #1663: the cache's length is a Python int attribute that ``update`` reads and writes, so a
    compiled decode step specialises on its value: a recompile every step (dynamo's recompile limit soon after),
    with the right logits. transformers #29114 moved StaticCache's seen-token count to a tensor for this."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        batch, _, count, _ = key_states.shape
        keys, values = keys[:batch], values[:batch]
        self.batch_size = batch
        start = self.lengths[layer_idx]  # the Python int the compiled step is specialised on
        positions = torch.arange(start, start + count, device=key_states.device)
        keys.index_copy_(2, positions, key_states)
        values.index_copy_(2, positions, value_states)
        self.lengths[layer_idx] = start + count
        return keys, values
