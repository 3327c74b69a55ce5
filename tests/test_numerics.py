"""Strict numerics is bitwise batch-invariant; fast numerics uses the standard kernels."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvverify import BUILTIN_CACHES, ModelConfig, ReferenceModel
from kvverify.reference import numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_strict_linear_gives_a_row_the_same_bits_in_any_batch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(29, 37, generator=g).to(dtype)
    for rows in range(1, 40):
        x = torch.randn(2, rows, 37, generator=g).to(dtype)
        assert torch.equal(numerics.linear(x, w)[:, -1:], numerics.linear(x[:, -1:], w))


def test_lane_stable_bits_do_not_depend_on_where_an_element_sits() -> None:
    x = torch.randn(1000, dtype=torch.float32)
    for offset in range(0, 70, 7):
        shifted = torch.cat((torch.randn(offset), x))
        assert torch.equal(numerics.lane_stable(torch.exp, shifted)[offset:], numerics.lane_stable(torch.exp, x))
        assert torch.equal(numerics.lane_stable(torch.sin, shifted)[offset:], numerics.lane_stable(torch.sin, x))


def test_strict_attention_ignores_masked_keys_wherever_they_are() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1, 4, generator=g) for _ in range(3))
    visible = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    alone = numerics.attention(q, k, v, visible, None)
    junk = torch.randn(1, 2, 5, 4, generator=g)
    padded_k, padded_v = torch.cat((junk, k), 2), torch.cat((junk, v), 2)
    mask = torch.tensor([False] * 5 + [True]).view(1, 1, 1, 6)
    assert torch.equal(numerics.attention(q, padded_k, padded_v, mask, None), alone)


GRID = list(itertools.product(["rope", "learned", "alibi", "none"], [None, 3], [torch.float32, torch.float16]))


@pytest.mark.parametrize(("positional", "window", "dtype"), GRID)
def test_strict_cached_logits_are_bitwise_uncached(positional: str, window: int | None, dtype: torch.dtype) -> None:
    config = ModelConfig(vocab_size=40, d_model=12, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, d_ff=20,
                         positional=positional, sliding_window=window, max_seq_len=24, dtype=dtype)  # type: ignore[arg-type]
    model = ReferenceModel(config, seed=3)
    prompt = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    expected = model.generate(prompt, 9, use_cache=False, attention_mask=mask)
    for name, factory in BUILTIN_CACHES.items():
        actual = model.generate(prompt, 9, cache=factory(config), attention_mask=mask)
        assert torch.equal(actual.logits, expected.logits), name


def test_fast_numerics_differs_from_strict_only_by_float_noise() -> None:
    strict = ReferenceModel(ModelConfig.preset("tiny"), seed=0)
    fast = ReferenceModel(ModelConfig.preset("tiny", numerics="fast"), seed=0)
    prompt = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = strict(prompt), fast(prompt)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_weights_are_deterministic_from_the_seed() -> None:
    config = ModelConfig.preset("tiny")
    a, b, c = ReferenceModel(config, seed=1), ReferenceModel(config, seed=1), ReferenceModel(config, seed=2)
    assert torch.equal(a.lm_head, b.lm_head) and not torch.equal(a.lm_head, c.lm_head)
