"""What the bitwise oracle costs: one uncached forward in strict numerics against fast numerics (torch's standard
kernels) at the same thread count, side by side, on the configs that set the fixed-order kernels' targets
(strict ÷ fast at most 3× at d_model 512 and 4× at 1024; peak memory within 2× of fast).

``pytest profiles/test_strict_speed.py -m benchmark --benchmark-only -s`` prints one row per config: the best
time of each numerics, the ratio, and the peak of torch's CPU allocations during one forward (memray, where it
is installed), and which strict kernel ran (``native``: :mod:`kvverify.reference.fixed_order`; ``python``: its
pure-PyTorch fallback, ``KVVERIFY_KERNELS=python``). One thread, float32, batch 1,
``ModelConfig(vocab_size=1000, n_layers=1, n_kv_heads=2, d_ff=int(2.75 * d) // 8 * 8, max_seq_len=tokens)`` with 4,
4 and 8 query heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvverify.profiling.floor import best_seconds
from kvverify.protocol.config import ModelConfig
from kvverify.reference import fixed_order
from kvverify.reference.model import ReferenceModel
from kvverify.reference.threads import torch_threads

pytestmark = pytest.mark.benchmark

#: (d_model, head_dim, tokens, query heads): the configs of the fixed-order kernels' targets.
CONFIGS = ((256, 64, 128, 4), (512, 128, 256, 4), (1024, 128, 256, 8))
#: Best of this many forwards per numerics (strict at d_model 1024 takes seconds each).
REPEATS = {256: 5, 512: 3, 1024: 2}


def _config(d_model: int, head_dim: int, tokens: int, heads: int, numerics: str) -> ModelConfig:
    return ModelConfig(vocab_size=1000, d_model=d_model, n_layers=1, n_heads=heads, n_kv_heads=2, head_dim=head_dim,
                       d_ff=int(2.75 * d_model) // 8 * 8, max_seq_len=tokens, numerics=numerics)


def _peak_bytes(forward: Callable[[], Any]) -> int | None:
    """Peak of the allocations during one forward, as memray sees them (None without memray)."""
    try:
        import memray
    except ImportError:
        return None
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "forward.bin"
        with memray.Tracker(path, native_traces=False):
            forward()
        return int(memray.FileReader(path).metadata.peak_memory)


@pytest.mark.parametrize(("d_model", "head_dim", "tokens", "heads"), CONFIGS)
def test_strict_against_fast_uncached_forward(benchmark: Any, d_model: int, head_dim: int, tokens: int,
                                              heads: int) -> None:
    prompt = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    models = {numerics: ReferenceModel(_config(d_model, head_dim, tokens, heads, numerics), seed=0)
              for numerics in ("fast", "strict")}

    def forward(numerics: str) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return models[numerics](prompt)
        return run

    def measure() -> float:
        with torch_threads(1):
            seconds = {n: best_seconds(forward(n), REPEATS[d_model]) for n in models}
            peaks = {n: _peak_bytes(forward(n)) for n in models}
        benchmark.extra_info.update(fast_s=seconds["fast"], strict_s=seconds["strict"],
                                    fast_peak=peaks["fast"], strict_peak=peaks["strict"])
        return seconds["strict"] / seconds["fast"]

    ratio = benchmark.pedantic(measure, rounds=1, iterations=1)
    info = benchmark.extra_info
    memory = ""
    if info["fast_peak"] and info["strict_peak"]:
        memory = (f"; peak {info['fast_peak'] / 2**20:.1f} MiB fast, {info['strict_peak'] / 2**20:.1f} MiB strict "
                  f"({info['strict_peak'] / info['fast_peak']:.1f}x)")
    kernel = "native" if fixed_order.applies(prompt.float()) else "python"
    print(f"\nd_model {d_model}, head_dim {head_dim}, {tokens} tokens, {heads} heads: fast "
          f"{1e3 * info['fast_s']:.1f} ms, strict ({kernel}) {1e3 * info['strict_s']:.0f} ms, "
          f"strict / fast {ratio:.1f}x{memory}")
