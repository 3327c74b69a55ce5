"""The property fails for a built-in cache broken on purpose, and the report says where and how to reproduce."""

from __future__ import annotations

from typing import Any

import torch

from kvverify import ContiguousCache, ModelConfig, StaticCache
from kvverify.checks import PROPERTIES, make_target
from kvverify.runs import run_property


class DropsATokenCache(ContiguousCache):
    """Forgets the oldest token once it holds nine."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if keys.shape[-2] > 8:
            self.keys[layer_idx], self.values[layer_idx] = keys[:, :, 1:], values[:, :, 1:]
        return self.keys[layer_idx], self.values[layer_idx]


class ShiftsAPositionCache(StaticCache):
    """Writes decode tokens one slot late."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        position = (cache_kwargs or {})["cache_position"]
        if position.numel() == 1 and int(position) + 1 < self.keys[layer_idx].shape[2]:
            cache_kwargs = {"cache_position": position + 1}
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


def run(factory: Any, name: str) -> Any:
    return run_property(PROPERTIES["cached_equals_uncached"], make_target(factory, name), profile="dev", seed=0)


def test_a_dropped_token_is_found_and_shrunk() -> None:
    result = run(lambda config: DropsATokenCache(), "drops-a-token")
    assert result.verdict == "failed"
    assert "minimal case" in result.detail and "max_new_tokens" in result.detail


def shifted_static(c: ModelConfig) -> ShiftsAPositionCache:
    return ShiftsAPositionCache(n_layers=c.n_layers, max_batch_size=c.max_batch_size, n_kv_heads=c.n_kv_heads,
                                max_seq_len=c.max_seq_len, head_dim=c.head_dim, dtype=c.dtype, device=c.device)


def test_a_shifted_position_is_found() -> None:
    assert run(shifted_static, "shifts-a-position").verdict == "failed"


def test_the_correct_caches_pass() -> None:
    for factory in (ContiguousCache.from_config, StaticCache.from_config):
        result = run(factory, "correct")
        assert result.verdict == "passed" and result.examples == 50
