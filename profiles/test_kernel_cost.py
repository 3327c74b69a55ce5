"""What one small kernel call costs on this machine, warm and right after a weight has streamed through the
caches, and how fast one core reads a bench-sized weight: the two costs a decoded token is made of.

``pytest profiles/test_kernel_cost.py -m benchmark --benchmark-only -s`` prints both, measured side by side.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from kvverify.protocol.config import ModelConfig

pytestmark = pytest.mark.benchmark


def _weight_bytes(config: ModelConfig) -> int:
    """Bytes of every matrix one decode step multiplies by (QKV, output, gate-up, down per layer; LM head)."""
    c = config
    per_layer = c.d_model * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim + 3 * c.d_ff)
    return 4 * (c.n_layers * per_layer + c.d_model * c.vocab_size)  # float32


def _median_us(call: Callable[[], Any], before: Callable[[], Any], repeats: int = 2000) -> float:
    samples = []
    for _ in range(repeats):
        before()
        begin = time.perf_counter()
        call()
        samples.append(time.perf_counter() - begin)
    return 1e6 * statistics.median(samples)


def _seconds(call: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def test_small_kernel_warm_and_after_a_weight_stream(benchmark: Any) -> None:
    config = ModelConfig.preset("bench")
    gate_up = torch.randn(1, 2 * config.d_ff)  # (B, 2 d_ff): the MLP's activation, as in a decoded token
    weights = torch.randn(_weight_bytes(config) // 4)

    def small_kernels() -> torch.Tensor:
        return F.silu(gate_up[:, : config.d_ff]).mul_(gate_up[:, config.d_ff :])

    def measure() -> float:
        warm = _median_us(small_kernels, lambda: None)
        cold = _median_us(small_kernels, weights.sum)  # sum: one read of every weight, as a decoded token does
        stream_s = min(_seconds(weights.sum) for _ in range(20))
        benchmark.extra_info.update(
            warm_us=warm,
            after_stream_us=cold,
            weight_mb=weights.numel() * 4 / 1e6,
            read_gb_per_s=weights.numel() * 4 / stream_s / 1e9,
        )
        return cold / warm

    value = benchmark.pedantic(measure, rounds=1, iterations=1)
    info = benchmark.extra_info
    print(
        f"\nsilu + multiply on (1, {config.d_ff}): {info['warm_us']:.1f} us warm, {info['after_stream_us']:.1f} us "
        f"right after reading {info['weight_mb']:.1f} MB ({value:.1f}x); one core reads it at "
        f"{info['read_gb_per_s']:.0f} GB/s ({1e3 * info['weight_mb'] / info['read_gb_per_s']:.0f} us per token)"
    )
