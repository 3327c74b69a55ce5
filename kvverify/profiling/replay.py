"""Drive a cache with the key/value updates of one generation, without the model, so that its memory and
allocations are the cache's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.protocol.config import ModelConfig


@dataclass(frozen=True)
class UpdatePlan:
    """A prefill of ``prompt`` tokens, then one token per step until ``length`` tokens were written."""

    batch: int
    prompt: int
    length: int

    def __post_init__(self) -> None:
        if not 1 <= self.prompt <= self.length:
            raise ValueError(f"need 1 <= prompt <= length; got prompt={self.prompt}, length={self.length}.")


def replay(make_cache: Callable[[ModelConfig], Any], config: ModelConfig, plan: UpdatePlan) -> Callable[[], Any]:
    """A callable that builds a cache, feeds it the updates of ``plan`` and returns it. The inputs are built
    here, before the callable runs, so a tracker around the call sees only what the cache allocates."""
    shape = (plan.batch, config.n_kv_heads, 0, config.head_dim)
    make = torch.Generator().manual_seed(0)

    def states(count: int) -> torch.Tensor:  # (B, Hkv, count, D)
        full = (shape[0], shape[1], count, shape[3])
        return torch.randn(full, generator=make, dtype=torch.float32).to(config.dtype).to(config.device)

    prefill_k, prefill_v = states(plan.prompt), states(plan.prompt)
    step_k, step_v = states(1), states(1)
    positions = [torch.arange(p, p + 1, device=config.device) for p in range(plan.prompt, plan.length)]
    prefill_position = torch.arange(plan.prompt, device=config.device)

    def run() -> Any:
        cache = make_cache(config)
        for layer in range(config.n_layers):
            cache.update(prefill_k, prefill_v, layer, {"cache_position": prefill_position})
        for position in positions:
            for layer in range(config.n_layers):
                cache.update(step_k, step_v, layer, {"cache_position": position})
        return cache

    return run
