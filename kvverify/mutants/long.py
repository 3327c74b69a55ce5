"""Bugs that show only past 2048 tokens, and a fork whose copy shares the original's buffers (parent: the static
cache). The suite's regular properties draw sequences of a few dozen tokens; the ``long_context`` property
(one strict generation of 2304 tokens) is what reaches the first two."""

from __future__ import annotations

import copy
from typing import Any

import torch

from kvverify.caches import StaticCache
from kvverify.caches._common import new_positions
from kvverify.protocol.cache import CacheDeclaration
from kvverify.protocol.config import ModelConfig

#: Where the long-context mutants break: the first token that does not fit in 11 bits.
LIMIT = 2048


class PositionsInTwelveBits(StaticCache):
    """vllm-project/tpu-inference #2756 (positions held in int16, wrong past 32,767 tokens), scaled down to a
    12-bit signed field: position 2048 wraps to -2048, and the write lands at that offset from the end of the
    buffer, over an older token, while the slot the token belongs in stays empty. Right for 2048 tokens."""

    # its write path reads positions back into Python ints, which a compiled step specialises on; the bug it
    # plants is past 2048 tokens, so it does not ask for the compiled property (long_context kills it)
    kvverify_declaration = CacheDeclaration()

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = key_states.shape[-2]
        positions = new_positions(cache_kwargs, self.lengths[layer_idx], count, key_states.device)
        narrow = (positions + LIMIT) % (2 * LIMIT) - LIMIT  # the 12-bit signed value of each position
        slots = narrow % self.keys[layer_idx].shape[2]  # a negative index counts from the end
        written = max(self.lengths[layer_idx], int(positions.max()) + 1)
        keys, values = super().update(key_states, value_states, layer_idx, {"cache_position": slots})
        self.lengths[layer_idx] = written  # the length itself is kept in a wide integer
        return keys, values


class StopsGrowingAt2048(StaticCache):
    """finnvoor/CoreMLPipelines #3: a model converted with a 2048-token context; clamping the write position
    to the last slot (the fix first proposed there) keeps overwriting slot 2047, so every token past 2048 is
    read back as the newest one and the tokens it replaced are lost. Right for 2048 tokens."""

    # its write path reads positions back into Python ints, which a compiled step specialises on; the bug it
    # plants is past 2048 tokens, so it does not ask for the compiled property (long_context kills it)
    kvverify_declaration = CacheDeclaration()

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> StaticCache:
        return super().from_config(config.replace(max_seq_len=min(config.max_seq_len, LIMIT)), dtype=dtype)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = key_states.shape[-2]
        positions = new_positions(cache_kwargs, self.lengths[layer_idx], count, key_states.device)
        written = max(self.lengths[layer_idx], int(positions.max()) + 1)
        clamped = positions.clamp(max=self.keys[layer_idx].shape[2] - 1)
        keys, values = super().update(key_states, value_states, layer_idx, {"cache_position": clamped})
        self.lengths[layer_idx] = written
        # the whole written range is claimed: slots past the buffer read as the clamped last one
        index = torch.arange(written, device=keys.device).clamp(max=keys.shape[2] - 1)
        return keys.index_select(2, index), values.index_select(2, index)


class ForkSharesBuffers(StaticCache):
    """gpytorch #785 (a deepcopy that lets the copy share the original's cached tensors): ``copy.deepcopy``
    copies the lists and lengths but not the tensors, so after a fork the copy and the original write into the
    same buffers. Invisible while only one of them is used after the fork."""

    def __deepcopy__(self, memo: dict[int, Any]) -> ForkSharesBuffers:
        twin = copy.copy(self)
        twin.keys, twin.values, twin.lengths = list(self.keys), list(self.values), list(self.lengths)
        return twin
