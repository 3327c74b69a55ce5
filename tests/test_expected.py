"""One teacher-forced forward gives every step's uncached logits bit for bit in strict numerics, and strict
attention's key spans and skipped gathers change no bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvverify import BUILTIN_CACHES, ModelConfig, ReferenceModel
from kvverify.checks.compare import first_difference, tolerance_for
from kvverify.checks.expected import expected_generation, teacher_forced
from kvverify.reference import numerics

pytestmark = pytest.mark.slow  # teacher-forced against step-by-step logits, drawn long cases: 40 s of CPU

CONFIGS = [
    # (positional, window, n_heads, n_kv_heads, dtype)
    ("rope", None, 4, 2, "float32"),
    ("rope", 5, 4, 1, "float32"),
    ("alibi", 3, 2, 2, "float64"),
    ("learned", None, 4, 4, "bfloat16"),
    ("none", 7, 4, 2, "float16"),
    ("rope", 4, 6, 3, "float64"),
]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize(("positional", "window", "heads", "kv_heads", "dtype"), CONFIGS)
def test_teacher_forced_logits_are_the_step_by_step_uncached_bits(
    positional: str, window: int | None, heads: int, kv_heads: int, dtype: str
) -> None:
    config = ModelConfig(vocab_size=48, d_model=24, n_layers=2, n_heads=heads, n_kv_heads=kv_heads, head_dim=8,
                         d_ff=40, positional=positional, sliding_window=window, max_seq_len=40,
                         dtype=dtype)  # type: ignore[arg-type]
    model = ReferenceModel(config, seed=5)
    prompt = torch.randint(0, 48, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    for attention_mask in (mask, None):
        step_by_step = model.generate(prompt, 30, use_cache=False, attention_mask=attention_mask)
        forced = teacher_forced(model, prompt, step_by_step.tokens, attention_mask)
        assert torch.equal(_bits(forced.logits), _bits(step_by_step.logits))
        assert torch.equal(forced.tokens, step_by_step.tokens)
        assert torch.equal(forced.sequences, step_by_step.sequences)
        assert torch.equal(forced.attention_mask, step_by_step.attention_mask)


def test_a_cached_run_is_compared_with_the_step_by_step_bits() -> None:
    config = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                         sliding_window=6, max_seq_len=48)
    model = ReferenceModel(config, seed=2)
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    step_by_step = model.generate(prompt, 40, use_cache=False, attention_mask=mask)
    for name, factory in BUILTIN_CACHES.items():
        actual = model.generate(prompt, 40, cache=factory(config), attention_mask=mask)
        expected = expected_generation(model, prompt, 40, mask, actual)
        assert torch.equal(_bits(expected.logits), _bits(step_by_step.logits)), name


def test_where_the_cached_tokens_leave_the_greedy_path_the_expected_logits_are_still_exact() -> None:
    config = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, head_dim=8, max_seq_len=32)
    model = ReferenceModel(config, seed=4)
    prompt = torch.randint(0, 40, (1, 4), generator=torch.Generator().manual_seed(0))
    truth = model.generate(prompt, 12, use_cache=False)
    wrong = truth.tokens.clone()
    wrong[0, 5] = (wrong[0, 5] + 1) % 40  # a cache that chose another token at step 5
    forced = teacher_forced(model, prompt, wrong)
    assert torch.equal(_bits(forced.logits[:, :6]), _bits(truth.logits[:, :6]))  # up to and including step 5
    assert int(forced.tokens[0, 5]) == int(truth.tokens[0, 5]) != int(wrong[0, 5])


def test_fast_numerics_is_teacher_forced_too_within_the_tolerance_of_the_step_by_step_recomputation() -> None:
    config = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, numerics="fast")
    model = ReferenceModel(config, seed=1)
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(0))
    actual = model.generate(prompt, 10, cache=BUILTIN_CACHES["static"](config))
    expected = expected_generation(model, prompt, 10, None, actual)
    assert torch.equal(expected.logits, teacher_forced(model, prompt, actual.tokens).logits)
    step_by_step = model.generate(prompt, 10, use_cache=False)
    assert torch.equal(expected.tokens, step_by_step.tokens)
    assert first_difference(step_by_step, expected, tolerance_for(config.dtype)) is None


def _gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Strict attention as it was written before key spans: every key, every query's keys gathered."""
    batch, n_heads, t_q, head_dim = q.shape
    n_kv_heads, s = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(compute).view(batch, n_kv_heads, group, t_q, 1, head_dim)
    scores = numerics.tree_sum(qg * k.to(compute)[:, :, None, None], -1) * (1.0 / math.sqrt(head_dim))
    scores = scores.reshape(batch, n_heads, t_q, s)
    if bias is not None:
        scores = scores + bias.to(compute)
    scores = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices
    scores = scores.gather(-1, order.expand(batch, n_heads, t_q, s))
    weights = numerics.lane_stable(torch.exp, scores - scores.amax(-1, keepdim=True))
    probs = weights / numerics.tree_sum(weights, -1)[..., None]
    rows = order[..., None].expand(batch, n_kv_heads, t_q, s, head_dim)
    values = v.to(compute)[:, :, None].expand(batch, n_kv_heads, t_q, s, head_dim).gather(3, rows)
    out = numerics.tree_sum(probs.view(batch, n_kv_heads, group, t_q, s, 1) * values[:, :, None], -2)
    return out.reshape(batch, n_heads, t_q, head_dim).to(q.dtype)


MASKS = ["causal", "padded", "window", "random", "decode_in_buffer"]


@pytest.mark.parametrize(("kind", "dtype"), list(itertools.product(MASKS, [torch.float32, torch.float16])))
def test_strict_attention_over_key_spans_has_the_bits_of_gathering_every_key(kind: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(MASKS.index(kind))
    batch, heads, kv_heads, t_q, s, dim = 2, 4, 2, 40, 70, 6
    q = torch.randn(batch, heads, t_q, dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, s, dim, generator=g).to(dtype) for _ in range(2))
    v = v * torch.randn(batch, kv_heads, s, 1, generator=g).exp().to(dtype)  # magnitudes apart: rounding shows
    query_slot = torch.arange(s - t_q, s)[:, None]  # (Tq, 1): the newest Tq slots are the queries
    key_slot = torch.arange(s)[None]  # (1, S)
    visible = (key_slot <= query_slot)[None, None].expand(batch, 1, t_q, s).clone()
    if kind == "padded":
        visible[1, :, :, :7] = False
    elif kind == "window":
        visible &= key_slot > query_slot - 9
    elif kind == "random":
        visible &= torch.rand(batch, 1, t_q, s, generator=g) < 0.6
        visible[..., 0] = True
    elif kind == "decode_in_buffer":  # one query against a preallocated buffer: the tail is never written
        q, visible = q[:, :, :1], (key_slot < 37)[None, None].expand(batch, 1, 1, s)
    bias = torch.randn(batch, heads, q.shape[2], s, generator=g).to(dtype)
    for b in (None, bias):
        spans = numerics.attention(q, k, v, visible, b)
        assert torch.equal(_bits(spans), _bits(_gathered_attention(q, k, v, visible, b)))
