"""Strict numerics is bitwise on every device: the same checks on the CPU (always) and on CUDA (when present).

On CUDA, torch's own reductions choose their order by the tensor's shape, so these are the checks that tell a
construction that is bitwise by design from one that happens to be on this CPU. The number of drawn cases per
cache is ``KVVERIFY_DEVICE_CASES`` (default: 5 on the CPU, where the property suite draws many more, and 200 on
CUDA); the production shapes decode fewer tokens on the CPU. ``scripts/gpu-check`` runs them on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvverify import BUILTIN_CACHES, ModelConfig, ReferenceModel
from kvverify.checks.case import Case
from kvverify.checks.compare import first_difference, tolerance_for
from kvverify.checks.strategies import cases

pytestmark = pytest.mark.slow  # strict numerics' bits over four dtypes and drawn shapes: 30 s of CPU

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = ("float64", "float32", "bfloat16", "float16")


def _examples(device: str) -> int:
    return int(os.environ.get("KVVERIFY_DEVICE_CASES", "200" if device == "cuda" else "5"))


def _on(case: Case, device: str) -> Case:
    return Case(case.config.replace(device=device), case.prompt, case.pad, case.max_new_tokens, case.seed)


def _assert_cached_equals_uncached(case: Case, cache_name: str) -> None:
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    expected = model.generate(prompt, case.max_new_tokens, use_cache=False, attention_mask=mask)
    actual = model.generate(prompt, case.max_new_tokens, cache=BUILTIN_CACHES[cache_name](case.config),
                            attention_mask=mask)
    assert torch.equal(actual.logits, expected.logits), (
        f"{cache_name} on {case.config.device}: cached logits differ from uncached by "
        f"{(actual.logits.double() - expected.logits.double()).abs().max().item():.3g}; a correct cache, so the "
        f"strict oracle is not bitwise here.\n{case.describe()}\n{first_difference(expected, actual)}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_name", sorted(BUILTIN_CACHES))
def test_drawn_strict_cases_are_bitwise_with_every_builtin_cache(device: str, cache_name: str) -> None:
    window = st.integers(1, 12) if cache_name == "sliding" else None

    @settings(max_examples=_examples(device), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(dtype=ALL_DTYPES, sliding_window=window))
    def check(case: Case) -> None:
        _assert_cached_equals_uncached(_on(case, device), cache_name)

    check()


def _production_case(device: str, head_dim: int, dtype: torch.dtype, window: int | None) -> Case:
    """head_dim 64/128, GQA, batch 4 left-padded, 40 tokens: the shapes where CUDA's reductions split."""
    small = device == "cpu"  # the strict path is slow on a CPU: one layer, fewer tokens, same head_dim
    config = ModelConfig(vocab_size=256, d_model=head_dim if small else 2 * head_dim, n_layers=1 if small else 2,
                         n_heads=4, n_kv_heads=2, head_dim=head_dim, d_ff=head_dim if small else 3 * head_dim,
                         max_seq_len=64, sliding_window=window, dtype=dtype, device=device)
    length, new = (8, 3) if small else (24, 17)
    generator = torch.Generator().manual_seed(head_dim)
    prompt = torch.randint(0, 256, (4, length), generator=generator).tolist()
    return Case(config, tuple(map(tuple, prompt)), pad=(0, 3, length // 2, 1), max_new_tokens=new, seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_production_head_dims_are_bitwise_in_every_dtype(device: str, head_dim: int, dtype: torch.dtype) -> None:
    for cache_name in ("contiguous", "static", "paged"):
        _assert_cached_equals_uncached(_production_case(device, head_dim, dtype, None), cache_name)
    _assert_cached_equals_uncached(_production_case(device, head_dim, dtype, 9), "sliding")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_row_alone_equals_the_same_row_in_a_batch(device: str, head_dim: int, dtype: torch.dtype) -> None:
    case = _production_case(device, head_dim, dtype, None)
    model, prompt, mask = case.model(), case.tokens(), case.attention_mask()
    batched = model.generate(prompt, 3, use_cache=False, attention_mask=mask)
    for row in range(case.batch):
        pad = case.pad[row]
        alone = model.generate(prompt[row : row + 1, pad:], 3, use_cache=False)
        assert torch.equal(alone.logits[0], batched.logits[row]), f"row {row} (pad {pad}) differs alone on {device}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fast_numerics_generates_on_the_device_within_tolerance(device: str, dtype: torch.dtype) -> None:
    config = ModelConfig.preset("bench", n_layers=2, max_seq_len=256, dtype=dtype, device=device)
    model = ReferenceModel(config, seed=0)
    prompt = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)).to(device)
    expected = model.generate(prompt, 24, use_cache=False)
    for cache_name in ("contiguous", "static", "paged"):
        actual = model.generate(prompt, 24, cache=BUILTIN_CACHES[cache_name](config))  # the flat decode step
        mismatch = first_difference(expected, actual, tolerance_for(dtype))
        assert mismatch is None, f"fast numerics, {cache_name} on {device}: {mismatch}"
