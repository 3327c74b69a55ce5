from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES
from kvverify.engine import decode as fast_decode
from kvverify.reference.config import ModelConfig
from kvverify.reference.model import ReferenceModel

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
}


def fast_model(seed: int = 0, **overrides: Any) -> ReferenceModel:
    return ReferenceModel(ModelConfig.preset("tiny", numerics="fast", max_seq_len=48, **overrides), seed=seed)


def prompt(config: ModelConfig, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))


@contextmanager
def module_path(model: ReferenceModel) -> Iterator[None]:
    """The model without its flat step: every token goes through its modules."""
    step, model._decode_step = model._decode_step, None
    try:
        yield
    finally:
        model._decode_step = step


class _Refuse:
    """Stands in for the flat step where it must not run."""

    def __call__(self, *args: object) -> torch.Tensor:
        raise AssertionError("the flat decode step ran where the model's general path should have")


@pytest.mark.parametrize("cache_name", sorted(BUILTIN_CACHES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flat_step_equals_the_module_path(name: str, cache_name: str) -> None:
    model = fast_model(**CONFIGS[name])
    config = model.config
    tokens = prompt(config, length=12)
    make_cache = BUILTIN_CACHES[cache_name]
    flat_cache, module_cache = make_cache(config), make_cache(config)
    step = fast_decode.DecodeStep(model)
    with module_path(model):
        model(tokens[:, :4], cache=flat_cache, start=0)
        model(tokens[:, :4], cache=module_cache, start=0)
        for position in range(4, tokens.shape[1]):
            token = tokens[:, position : position + 1]
            flat = step(token, flat_cache, position)  # (B, vocab)
            expected = model(token, cache=module_cache, start=position)[:, -1]
            assert flat.shape == expected.shape, f"{name}/{cache_name}: shape {flat.shape} != {expected.shape}"
            assert torch.allclose(flat, expected, rtol=0, atol=ATOL), (
                f"{name}/{cache_name} at slot {position}: flat step differs from the module path by "
                f"{(flat - expected).abs().max().item():.3g}"
            )


@pytest.mark.parametrize("cache_name", sorted(BUILTIN_CACHES))
@pytest.mark.parametrize("name", ["gqa-rope", "mqa-rope", "window"])
def test_generate_with_the_flat_step_equals_the_module_path_and_continues(name: str, cache_name: str) -> None:
    model = fast_model(**CONFIGS[name])
    config, make_cache = model.config, BUILTIN_CACHES[cache_name]
    first = model.generate(prompt(config), 4, cache=make_cache(config))
    rest = model.generate(first.sequences, 5, cache=first.cache, attention_mask=first.attention_mask)
    with module_path(model):
        expected = model.generate(prompt(config), 9, cache=make_cache(config))
    logits = torch.cat((first.logits, rest.logits), dim=1)
    assert torch.allclose(logits, expected.logits, rtol=0, atol=ATOL), (
        f"{name}/{cache_name}: generate with the flat step differs by {(logits - expected.logits).abs().max():.3g}"
    )
    assert torch.equal(rest.sequences, expected.sequences), f"{name}/{cache_name}: greedy tokens differ"


@pytest.mark.parametrize("cache_factory", ["dynamic_cache", "static_cache"])
def test_flat_step_drives_transformers_caches(cache_factory: str) -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters import hf

    make_cache: Callable[[ModelConfig], Any] = getattr(hf, cache_factory)
    model = fast_model()
    out = model.generate(prompt(model.config), 6, cache=make_cache(model.config))
    with module_path(model):
        expected = model.generate(prompt(model.config), 6, cache=make_cache(model.config))
    assert torch.allclose(out.logits, expected.logits, rtol=0, atol=ATOL), f"{cache_factory}: logits differ"


def test_generate_uses_the_flat_step_when_unpadded() -> None:
    model = fast_model()
    step = model._decode_step
    assert step is not None, "a fast, RoPE model must get a flat decode step"
    calls, refreshes = [], []
    decode, refresh = step.decode, step.refresh

    def counting(tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        calls.append(start)
        return decode(tokens, cache, start)

    step.decode = counting  # type: ignore[method-assign]
    step.refresh = lambda: refreshes.append(1) or refresh()  # type: ignore[method-assign]
    model.generate(prompt(model.config, length=6), 5)
    assert calls == [6, 7, 8, 9], f"expected one flat step per decoded token after the prefill; got slots {calls}"
    assert refreshes == [1], f"generate must read the weights once per call; read them {len(refreshes)} times"


def test_a_forward_call_reads_changed_weights_every_step() -> None:
    model = fast_model()
    config = model.config
    tokens = prompt(config)
    cache = BUILTIN_CACHES["contiguous"](config)
    model(tokens, cache=cache)
    before = model(tokens[:, :1], cache=cache, start=tokens.shape[1])
    with torch.no_grad():
        model.layers[0].attn_norm.weight.mul_(2.0)  # a folded norm weight: the packed qkv must be rebuilt
    cache.crop(tokens.shape[1])
    after = model(tokens[:, :1], cache=cache, start=tokens.shape[1])
    with module_path(model):
        cache.crop(tokens.shape[1])
        expected = model(tokens[:, :1], cache=cache, start=tokens.shape[1])
    assert not torch.allclose(before, after), "the norm weight changed; so must the logits"
    assert torch.allclose(after, expected, rtol=0, atol=ATOL), "the flat step kept a stale folded weight"


def test_padding_falls_back_to_the_module_path() -> None:
    model = fast_model()
    row = prompt(model.config, batch=1, length=4)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), row), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with module_path(model):
        expected = model.generate(padded, 5, attention_mask=mask)
    model._decode_step = _Refuse()  # type: ignore[assignment]
    out = model.generate(padded, 5, attention_mask=mask)
    assert torch.equal(out.logits, expected.logits), "padded generation changed when the flat step was refused"


@pytest.mark.parametrize("overrides", [{"positional": "alibi"}, {"numerics": "strict"}])
def test_alibi_and_strict_models_have_no_flat_step(overrides: dict[str, Any]) -> None:
    config = ModelConfig.preset("tiny", **{"numerics": "fast", **overrides})
    assert not fast_decode.supports(config), f"{overrides}: needs a mask or strict arithmetic"
    model = ReferenceModel(config)
    assert model._decode_step is None, f"{overrides}: the model must decode through its modules"
    out = model.generate(prompt(config), 3)
    assert out.tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="fast numerics without ALiBi"):
        fast_decode.DecodeStep(model)


def test_flat_step_follows_changed_weights() -> None:
    model = fast_model()
    config = model.config
    tokens = prompt(config)
    first = model.generate(tokens, 3)  # builds the flat step's tables
    with torch.no_grad():
        model.layers[1].mlp.w_down.mul_(1.5)  # in place: the version counter moves
    model.lm_head.data = model.lm_head.data.flip(0)  # replaced: the pointer moves
    out = model.generate(tokens, 4)
    with module_path(model):
        expected = model.generate(tokens, 4)
    assert not torch.allclose(out.logits[:, :3], first.logits), "the weights changed; so must the logits"
    assert torch.allclose(out.logits, expected.logits, rtol=0, atol=ATOL), "the flat step kept stale weights"
