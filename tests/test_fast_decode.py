from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES
from kvverify.engine import decode
from kvverify.engine.decode import DecodeStep
from kvverify.engine.generation import generate
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel
from kvverify.reference.weights import ModelWeights

pytestmark = pytest.mark.slow  # the fast engine against the reference over drawn shapes: 40 s of CPU

ATOL = 1e-5  # float32

CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-rope": {},
    "mqa-rope": {"n_kv_heads": 1},
    "mha-rope": {"n_kv_heads": 4},
    "gqa-learned": {"positional": "learned"},
    "mha-none": {"positional": "none", "n_kv_heads": 4},
    "layernorm": {"norm": "layer"},
    "window": {"sliding_window": 5},
    "float64": {"dtype": "float64"},
    "bfloat16": {"dtype": "bfloat16"},
}


def fast_model(seed: int = 0, **overrides: Any) -> ReferenceModel:
    return ReferenceModel(ModelConfig.preset("tiny", numerics="fast", max_seq_len=48, **overrides), seed=seed)


def prompt(config: ModelConfig, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))


@contextmanager
def module_path() -> Iterator[None]:
    """generate without the decode step: every token goes through the model's modules."""
    with mock.patch.object(decode, "supports", lambda config: False):
        yield


class _Refuse(DecodeStep):
    """Stands in for the decode step where it must not be built."""

    def __init__(self, weights: ModelWeights, max_len: int | None = None) -> None:
        raise AssertionError("the decode step was built where the model's modules should have run")


def _atol(config: ModelConfig) -> float:
    return 0.05 if config.dtype == torch.bfloat16 else ATOL


@pytest.mark.parametrize("cache_name", sorted(BUILTIN_CACHES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_equals_the_module_path(name: str, cache_name: str) -> None:
    model = fast_model(**CONFIGS[name])
    config = model.config
    tokens = prompt(config, length=12)
    make_cache = BUILTIN_CACHES[cache_name]
    step_cache, module_cache = make_cache(config), make_cache(config)
    step = DecodeStep(model.weights())
    model(tokens[:, :4], cache=step_cache, start=0)
    model(tokens[:, :4], cache=module_cache, start=0)
    for position in range(4, tokens.shape[1]):
        token = tokens[:, position : position + 1]
        fast = step(token, step_cache, position)  # (B, vocab)
        expected = model(token, cache=module_cache, start=position)[:, -1]
        assert fast.shape == expected.shape, f"{name}/{cache_name}: shape {fast.shape} != {expected.shape}"
        assert torch.allclose(fast, expected, rtol=0, atol=_atol(config)), (
            f"{name}/{cache_name} at slot {position}: the decode step differs from the module path by "
            f"{(fast - expected).abs().max().item():.3g}"
        )


@pytest.mark.parametrize("cache_name", sorted(BUILTIN_CACHES))
@pytest.mark.parametrize("name", ["gqa-rope", "mqa-rope", "window"])
def test_generate_with_the_decode_step_equals_the_module_path_and_continues(name: str, cache_name: str) -> None:
    model = fast_model(**CONFIGS[name])
    config, make_cache = model.config, BUILTIN_CACHES[cache_name]
    first = model.generate(prompt(config), 4, cache=make_cache(config))
    rest = model.generate(first.sequences, 5, cache=first.cache, attention_mask=first.attention_mask)
    with module_path():
        expected = model.generate(prompt(config), 9, cache=make_cache(config))
    logits = torch.cat((first.logits, rest.logits), dim=1)
    assert torch.allclose(logits, expected.logits, rtol=0, atol=ATOL), (
        f"{name}/{cache_name}: generate with the decode step differs by {(logits - expected.logits).abs().max():.3g}"
    )
    assert torch.equal(rest.sequences, expected.sequences), f"{name}/{cache_name}: greedy tokens differ"


@pytest.mark.parametrize("cache_factory", ["dynamic_cache", "static_cache"])
def test_decode_step_drives_transformers_caches(cache_factory: str) -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters import hf

    make_cache: Callable[[ModelConfig], Any] = getattr(hf, cache_factory)
    model = fast_model()
    out = model.generate(prompt(model.config), 6, cache=make_cache(model.config))
    with module_path():
        expected = model.generate(prompt(model.config), 6, cache=make_cache(model.config))
    assert torch.allclose(out.logits, expected.logits, rtol=0, atol=ATOL), f"{cache_factory}: logits differ"


def test_generate_packs_the_weights_once_and_decodes_every_token_after_the_prefill() -> None:
    model = fast_model()
    built: list[ModelWeights] = []
    calls: list[int] = []

    class Counting(DecodeStep):
        def __init__(self, weights: ModelWeights, max_len: int | None = None) -> None:
            built.append(weights)
            super().__init__(weights, max_len)

        def __call__(self, tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
            calls.append(start)
            return super().__call__(tokens, cache, start)

    with mock.patch.object(decode, "DecodeStep", Counting):
        generate(model, prompt(model.config, length=6), 5)  # the engine's generation: the oracle never decodes fast
    assert calls == [6, 7, 8, 9], f"expected one decode step per decoded token after the prefill; got slots {calls}"
    assert len(built) == 1, f"generate must pack the weights once per call; packed them {len(built)} times"


def test_a_decode_step_keeps_the_weights_it_was_built_from() -> None:
    model = fast_model()
    config = model.config
    tokens = prompt(config)
    cache = BUILTIN_CACHES["contiguous"](config)
    before = DecodeStep(model.weights())
    model(tokens, cache=cache)
    slot = tokens.shape[1]
    old = before(tokens[:, :1], cache, slot)
    with torch.no_grad():
        model.layers[0].attn_norm.weight.mul_(2.0)  # a norm weight the step folds into its packed qkv
    cache.crop(slot)
    kept = before(tokens[:, :1], cache, slot)
    cache.crop(slot)
    fresh = DecodeStep(model.weights())(tokens[:, :1], cache, slot)
    cache.crop(slot)
    expected = model(tokens[:, :1], cache=cache, start=slot)[:, -1]
    assert torch.equal(kept, old), "a decode step built before the change must keep the weights it packed"
    assert not torch.allclose(fresh, old), "the norm weight changed; so must the logits of a new decode step"
    assert torch.allclose(fresh, expected, rtol=0, atol=ATOL), "a new decode step must read the changed weight"


def test_padding_falls_back_to_the_module_path() -> None:
    model = fast_model()
    row = prompt(model.config, batch=1, length=4)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), row), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with module_path():
        expected = model.generate(padded, 5, attention_mask=mask)
    with mock.patch.object(decode, "DecodeStep", _Refuse):
        out = model.generate(padded, 5, attention_mask=mask)
    assert torch.equal(out.logits, expected.logits), "padded generation changed when the decode step was refused"


@pytest.mark.parametrize("overrides", [{"positional": "alibi"}, {"numerics": "strict"}])
def test_alibi_and_strict_models_have_no_decode_step(overrides: dict[str, Any]) -> None:
    config = ModelConfig.preset("tiny", **{"numerics": "fast", **overrides})
    assert not decode.supports(config), f"{overrides}: needs a mask or strict arithmetic"
    model = ReferenceModel(config)
    with mock.patch.object(decode, "DecodeStep", _Refuse):
        out = model.generate(prompt(config), 3)
    assert out.tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="fast numerics without ALiBi"):
        DecodeStep(model.weights())


def test_generate_follows_changed_weights() -> None:
    model = fast_model()
    config = model.config
    tokens = prompt(config)
    first = model.generate(tokens, 3)
    with torch.no_grad():
        model.layers[1].mlp.w_down.mul_(1.5)  # in place
    model.lm_head.data = model.lm_head.data.flip(0)  # replaced
    out = model.generate(tokens, 4)
    with module_path():
        expected = model.generate(tokens, 4)
    assert not torch.allclose(out.logits[:, :3], first.logits), "the weights changed; so must the logits"
    assert torch.allclose(out.logits, expected.logits, rtol=0, atol=ATOL), "generate decoded with stale weights"


def test_decode_step_takes_a_non_contiguous_attention_output() -> None:
    # CUDA's SDPA returns its rows with strides of its own choosing; the step must not assume a contiguous output.
    model = fast_model()
    config = model.config
    tokens = prompt(config, length=8)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def strided_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_sdpa(*args, **kwargs)  # (B, Hkv, group, D)
        strided = out.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, other strides
        assert not strided.is_contiguous()
        return strided

    expected_cache, strided_cache = BUILTIN_CACHES["contiguous"](config), BUILTIN_CACHES["contiguous"](config)
    step = DecodeStep(model.weights())
    for cache in (expected_cache, strided_cache):
        model(tokens[:, :4], cache=cache, start=0)
    for position in range(4, tokens.shape[1]):
        token = tokens[:, position : position + 1]
        expected = step(token, expected_cache, position)
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", strided_sdpa):
            strided = step(token, strided_cache, position)
        assert torch.equal(strided, expected), f"slot {position}: a strided attention output changed the logits"
