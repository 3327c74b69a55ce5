"""What one decoded token costs at least on this machine: the bytes a decode step must read (every weight it
multiplies by, the keys and values it attends to) against the read bandwidth measured here, and the
floating-point operations it does against the matmul throughput measured here; the floor is the larger of the
two. A decode step of one row is a chain of matrix-vector products, so on a CPU the bytes decide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvverify.protocol.config import ModelConfig


@dataclass(frozen=True)
class StepWork:
    """What one decode step of one row does at ``context`` keys."""

    weight_bytes: int  # every projection, the LM head, the norms and one embedding row
    cache_bytes: int  # the keys and values of every layer
    flops: int  # 2 per multiply-add: projections, LM head, q·k and the weighted sum of values

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes


def step_work(config: ModelConfig, context: int) -> StepWork:
    """The work of one decode step of one row of a model of ``config`` against ``context`` cached tokens."""
    c = config
    q_width, kv_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = c.d_model * (q_width + 2 * kv_width) + q_width * c.d_model + 3 * c.d_model * c.d_ff
    products = c.n_layers * per_layer + c.vocab_size * c.d_model  # multiply-adds of the projections and LM head
    itemsize = torch.empty((), dtype=c.dtype).element_size()
    norms = (2 * c.n_layers + 1) * c.d_model * (2 if c.norm == "layer" else 1)
    attention = c.n_layers * 2 * c.n_heads * c.head_dim * context  # q·k and the weighted values
    return StepWork(
        weight_bytes=(products + norms + c.d_model) * itemsize,
        cache_bytes=c.n_layers * 2 * kv_width * context * itemsize,
        flops=2 * (products + attention),
    )


@dataclass(frozen=True)
class Machine:
    """Measured on this machine, at the current torch thread count."""

    read_bytes_per_s: float  # reading a buffer of the step's size, warm in the caches as a decode loop keeps it
    flops_per_s: float  # a square float32 matmul

    def floor_s(self, work: StepWork) -> float:
        """The least time a step doing ``work`` can take here."""
        return max(work.bytes / self.read_bytes_per_s, work.flops / self.flops_per_s)


def measure_machine(buffer_bytes: int, *, repeats: int = 30, matmul_size: int = 512) -> Machine:
    """Read bandwidth over a float32 buffer of ``buffer_bytes`` (the best of ``repeats`` sums: each reads it
    once) and matmul throughput (the best of a few ``matmul_size``² products)."""
    buffer = torch.ones(max(1, buffer_bytes // 4), dtype=torch.float32)
    read = best_seconds(lambda: buffer.sum(), repeats)
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    product = best_seconds(lambda: a @ b, max(3, repeats // 6))
    return Machine(read_bytes_per_s=buffer.numel() * 4 / read, flops_per_s=2 * matmul_size**3 / product)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, after one untimed call (first-call allocations, lazy
    initialisation, a buffer brought into the caches)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - begin)
    return best
