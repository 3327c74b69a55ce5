"""The engine's strict decode step against the model's modules: the same logits and the same cache, bit for bit,
over positional schemes, norms, GQA and MQA, windows, dtypes, every built-in cache, and both kernel paths."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES
from kvverify.engine import native_step, strict_decode
from kvverify.engine.generation import generate
from kvverify.engine.strict_decode import StrictDecodeStep
from kvverify.protocol.config import ModelConfig
from kvverify.reference import fixed_order
from kvverify.reference.model import ReferenceModel
from kvverify.reference.weights import ModelWeights

CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-rope": {},
    "mqa-rope": {"n_kv_heads": 1},
    "mha-learned": {"positional": "learned", "n_kv_heads": 4},
    "gqa-none-layernorm": {"positional": "none", "norm": "layer"},
    "window": {"sliding_window": 5},
    "float64": {"dtype": "float64"},
    "bfloat16": {"dtype": "bfloat16"},
    "float16-window": {"dtype": "float16", "sliding_window": 3},
    # sizes that fill no vector: rows of 44, 11 and 37, a rotation of odd halves' neighbours, 3 heads to 1
    "odd-sizes": {"d_model": 44, "n_heads": 3, "n_kv_heads": 1, "head_dim": 10, "d_ff": 37, "vocab_size": 53},
    "float64-layernorm-learned": {"dtype": "float64", "norm": "layer", "positional": "learned"},
    "bfloat16-layernorm-learned-odd": {"dtype": "bfloat16", "norm": "layer", "positional": "learned", "d_model": 44,
                                       "n_heads": 3, "n_kv_heads": 1, "head_dim": 10, "d_ff": 37, "vocab_size": 53},
    "bfloat16-odd-rope-window": {"dtype": "bfloat16", "d_model": 44, "n_heads": 3, "n_kv_heads": 3, "head_dim": 10,
                                 "d_ff": 37, "sliding_window": 4},
}


def strict_model(**overrides: Any) -> ReferenceModel:
    return ReferenceModel(ModelConfig.preset("tiny", numerics="strict", max_seq_len=40, **overrides), seed=1)


def prompt(config: ModelConfig, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))


def _step_against_modules(model: ReferenceModel, cache_name: str, batch: int, name: str = "") -> None:
    config = model.config
    tokens = prompt(config, batch, 14)
    make = BUILTIN_CACHES[cache_name]
    step_cache, module_cache = make(config), make(config)
    step = StrictDecodeStep(model.weights())
    model(tokens[:, :5], cache=step_cache)
    model(tokens[:, :5], cache=module_cache)
    for slot in range(5, tokens.shape[1]):
        token = tokens[:, slot : slot + 1]
        got = step(token, step_cache, slot)  # (B, vocab)
        expected = model(token, cache=module_cache, start=slot)[:, -1]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), (
            f"{name}, {cache_name}, slot {slot}: the strict decode step differs from the model's modules by "
            f"{(got.double() - expected.double()).abs().max():.3g}"
        )
    after = model(tokens[:, :1], cache=step_cache, start=tokens.shape[1])  # the step left the cache as the model
    assert torch.equal(after, model(tokens[:, :1], cache=module_cache, start=tokens.shape[1]))


@pytest.mark.parametrize("cache_name", sorted(BUILTIN_CACHES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_strict_decode_step_is_the_models_bits(name: str, cache_name: str) -> None:
    _step_against_modules(strict_model(**CONFIGS[name]), cache_name, batch=2, name=name)


@pytest.mark.parametrize("name", ["gqa-rope", "bfloat16", "window"])
def test_the_pure_pytorch_kernels_give_the_step_the_same_bits(name: str) -> None:
    with fixed_order.use("python"):
        _step_against_modules(strict_model(**CONFIGS[name]), "contiguous", batch=3, name=name)


def test_one_row_alone() -> None:
    _step_against_modules(strict_model(n_kv_heads=1), "static", batch=1)


def test_generate_decodes_with_the_step_and_gives_the_models_bits() -> None:
    model = strict_model()
    tokens = prompt(model.config, 2, 6)
    calls: list[int] = []

    class Counting(StrictDecodeStep):
        def __call__(self, new: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
            calls.append(start)
            return super().__call__(new, cache, start)

    with mock.patch.object(strict_decode, "StrictDecodeStep", Counting):
        out = generate(model, tokens, 5)
    expected = model.generate(tokens, 5)  # the model alone: every step through its modules
    assert calls == [6, 7, 8, 9], f"expected one strict decode step per token after the prefill; got {calls}"
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.tokens, expected.tokens)


@pytest.mark.parametrize("overrides", [{"positional": "alibi"}, {"numerics": "fast"}])
def test_alibi_and_fast_models_have_no_strict_decode_step(overrides: dict[str, Any]) -> None:
    config = ModelConfig.preset("tiny", **{"numerics": "strict", **overrides})
    assert not strict_decode.supports(config)
    model = ReferenceModel(config)

    class Refuse(StrictDecodeStep):
        def __init__(self, weights: ModelWeights, max_len: int | None = None) -> None:
            raise AssertionError("the strict decode step was built where the model's modules should have run")

    with mock.patch.object(strict_decode, "StrictDecodeStep", Refuse):
        assert generate(model, prompt(config, 2, 4), 3).tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="strict numerics without ALiBi"):
        StrictDecodeStep(model.weights())


@pytest.mark.parametrize(("dtype", "native"),
                         [("float32", True), ("float64", True), ("bfloat16", True), ("float16", False)])
def test_every_dtype_but_float16_decodes_through_the_native_step(dtype: str, native: bool) -> None:
    calls: list[int] = []
    real = native_step.NativeStep.__call__

    def counting(self: native_step.NativeStep, tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        calls.append(start)
        return real(self, tokens, cache, start)

    with mock.patch.object(native_step.NativeStep, "__call__", counting):
        _step_against_modules(strict_model(dtype=dtype), "static", batch=2)
    assert bool(calls) == native, f"{dtype}: native step calls {calls}"
    with fixed_order.use("python"), mock.patch.object(native_step.NativeStep, "__call__", counting):
        calls.clear()
        _step_against_modules(strict_model(dtype=dtype), "static", batch=1)
    assert not calls, "the native step ran with the native kernels turned off"


@pytest.mark.parametrize("unreadable_from", [0, 1])
def test_a_layer_the_kernels_cannot_read_finishes_the_step_in_python(unreadable_from: int) -> None:
    """The cache's keys of a layer from ``unreadable_from`` on are taken as unreadable (a tensor subclass, say):
    that layer's attention and every later layer run in Python, with the same bits."""
    layers: list[int] = []  # per step, the layers whose keys were offered to the kernels
    real = native_step.NativeStep.__call__

    def step(self: native_step.NativeStep, tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        layers.clear()
        logits = real(self, tokens, cache, start)
        assert layers == list(range(unreadable_from + 1)), f"layers offered: {layers}"
        return logits

    def readable(self: native_step.NativeStep, keys: torch.Tensor, values: torch.Tensor) -> bool:
        layers.append(len(layers))
        return layers[-1] < unreadable_from

    with mock.patch.object(native_step.NativeStep, "__call__", step), \
            mock.patch.object(native_step.NativeStep, "_readable", readable):
        _step_against_modules(strict_model(), "paged", batch=2)


class _RepeatedHeads:
    """A cache that returns its keys and values repeated to every query head (B, H, S, D): wasteful, and read by
    the model as any head count that divides n_heads."""

    def __init__(self, config: ModelConfig) -> None:
        self.inner = BUILTIN_CACHES["contiguous"](config)
        self.group = config.n_heads // config.n_kv_heads

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.update(k, v, layer_idx, cache_kwargs)
        return keys.repeat_interleave(self.group, 1), values.repeat_interleave(self.group, 1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.get_seq_length(layer_idx))


def test_keys_repeated_to_every_query_head_give_the_models_bits() -> None:
    model = strict_model()
    with mock.patch.dict(BUILTIN_CACHES, {"repeated": _RepeatedHeads}):
        _step_against_modules(model, "repeated", batch=2)


def test_weights_in_any_memory_layout_give_the_models_bits() -> None:
    """Parameters stored transposed (a checkpoint's layout) hold the same values: the step copies them to its own
    layout."""
    model = strict_model()
    for param in model.parameters():
        if param.dim() == 2:
            param.data = param.data.T.contiguous().T  # the same values, column-major
    assert not model.lm_head.is_contiguous()
    _step_against_modules(model, "static", batch=2)
