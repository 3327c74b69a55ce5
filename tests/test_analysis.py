"""The analytical model against hand-computed values and against the bytes real caches hold."""

from __future__ import annotations

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling import analysis
from kvverify.profiling.hostmem import held_bytes, memray_allocations
from kvverify.profiling.replay import UpdatePlan, replay
from kvverify.protocol.config import ModelConfig


def test_kv_bytes_is_the_hidden_size_formula_for_multi_head_attention() -> None:
    config = ModelConfig(d_model=64, n_heads=4, n_layers=3)  # MHA: n_kv_heads * head_dim == d_model
    elements = analysis.hidden_size_formula_elements(config, 100, cached=True)
    assert analysis.kv_bytes(config, 100) == elements * 4, "float32 K/V bytes must be 4 × the formula's element count"


def test_kv_bytes_generalizes_gqa_batch_dtype_window_and_blocks() -> None:
    config = ModelConfig.preset("bench")  # 4 layers, 2 KV heads of 32
    assert analysis.kv_bytes(config, 512) == 2 * 4 * 2 * 32 * 512 * 4
    assert analysis.kv_bytes(config, 512, batch=3) == 3 * analysis.kv_bytes(config, 512)
    assert analysis.kv_bytes(config.replace(dtype=torch.bfloat16), 512) == analysis.kv_bytes(config, 512) // 2
    assert analysis.kv_bytes(config, 512, window=100) == analysis.kv_bytes(config, 100)
    assert analysis.kv_bytes(config, 10, block_size=4) == analysis.kv_bytes(config, 12)
    with pytest.raises(ValueError, match="seq_len"):
        analysis.kv_bytes(config, -1)


def test_flops_cached_step_is_linear_uncached_is_quadratic() -> None:
    config = ModelConfig.preset("bench")
    short, long = analysis.flops_per_token(config, 256), analysis.flops_per_token(config, 512)
    assert long.cached - short.cached == analysis.attention_flops(config, 1, 256), (
        "cached grows by one row of attention"
    )
    assert long.uncached > 2 * short.uncached, "uncached grows faster than linearly (t × t scores)"
    assert short.cached == 2 * analysis.matmul_params(config) + analysis.attention_flops(config, 1, 256)
    assert 0.99 < long.saved_fraction < 1.0


def test_uncached_peak_outgrows_the_hidden_size_figure() -> None:
    """The usual 2 × hidden × t elements leave out prefix activations and the t × t scores."""
    config = ModelConfig.preset("bench")
    formula_bytes = 4 * analysis.hidden_size_formula_elements(config, 1024, cached=False)
    assert analysis.uncached_peak_bytes(config, 1024) > 10 * formula_bytes
    assert analysis.uncached_peak_bytes(config, 1024) > analysis.kv_bytes(config, 1024)
    assert analysis.eager_scores_bytes(config, 1024) == 8 * 1024 * 1024 * 4


@pytest.mark.parametrize(
    ("name", "layout", "window"),
    [
        ("contiguous", "exact", None),
        ("sliding", "window", 8),
        ("static", "preallocated", None),
        ("paged", "paged", None),
    ],
)
def test_held_bytes_match_the_layout_prediction(name: str, layout: analysis.Layout, window: int | None) -> None:
    config = ModelConfig.preset("tiny", sliding_window=window)
    cache = replay(BUILTIN_CACHES[name], config, UpdatePlan(batch=2, prompt=5, length=40))()
    predicted = analysis.predicted_cache_bytes(layout, config, 40, batch=2)
    assert held_bytes(cache) == predicted, (
        f"{name} holds {held_bytes(cache)} B; the {layout} layout predicts {predicted} B"
    )


def test_memray_sees_torch_allocations() -> None:
    seen = memray_allocations(lambda: torch.zeros(1 << 20))  # 4 MiB
    assert seen.peak_bytes >= 4 << 20 and seen.total_bytes >= 4 << 20


def test_unknown_layout_is_rejected() -> None:
    with pytest.raises(ValueError, match="layout"):
        analysis.predicted_cache_bytes("ring", ModelConfig(), 4)  # type: ignore[arg-type]
