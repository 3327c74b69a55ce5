"""transformers' caches as kvverify targets: the exact ones are bitwise equal to recomputation under strict
numerics, the fp8 one stays within its declared tolerance, and each factory is a usable MODULE:FACTORY."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")

from kvverify.adapters import hf
from kvverify.checks.loading import load_factory
from kvverify.protocol.cache import CacheDeclaration, CacheFactory, declaration_of
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

EXACT = ["dynamic", "static", "sliding", "hybrid"]
SLIDING = {"sliding", "hybrid"}

# each with a window, so that every exact cache runs on it; a prompt of 7 and 10 new tokens run past it
CONFIGS: dict[str, dict[str, object]] = {
    "GQA-rope-w3": dict(n_kv_heads=2, sliding_window=3),
    "MQA-alibi-f64-w6": dict(n_kv_heads=1, positional="alibi", dtype=torch.float64, sliding_window=6),
    "MHA-learned-w5": dict(n_kv_heads=4, positional="learned", sliding_window=5, n_layers=3),
}
NO_WINDOW: dict[str, dict[str, object]] = {
    "GQA-rope": dict(n_kv_heads=2),
    "MQA-none-f64": dict(n_kv_heads=1, positional="none", dtype=torch.float64),
}


def _prompt(config: ModelConfig, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, 7) tokens and a mask that left-pads row 1 by 2 and row 2 by 6 (one real token)."""
    tokens = torch.randint(0, config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(tokens)
    if batch > 2:
        mask[1, :2], mask[2, :6] = 0, 0
    return tokens, mask


def _strict(overrides: dict[str, object]) -> ModelConfig:
    return ModelConfig.preset("tiny", numerics="strict", max_seq_len=32, **overrides)


# a sliding-window cache is only paired with models that have a window
PAIRS = [(name, shape) for name in EXACT for shape in sorted(CONFIGS) + sorted(NO_WINDOW)
         if not (shape in NO_WINDOW and name in SLIDING)]


@pytest.mark.parametrize(("name", "shape"), PAIRS)
def test_exact_cache_is_bitwise_equal_to_recomputation(name: str, shape: str) -> None:
    config = _strict({**CONFIGS, **NO_WINDOW}[shape])
    model = ReferenceModel(config, seed=2)
    prompt, mask = _prompt(config)
    expected = model.generate(prompt, 10, use_cache=False, attention_mask=mask)
    got = model.generate(prompt, 10, cache=hf.FACTORIES[name](config), attention_mask=mask)
    differ = (got.logits != expected.logits).any(-1).nonzero()
    where = f"first differing (row, step): {differ[0].tolist()}" if len(differ) else ""
    assert torch.equal(got.logits, expected.logits), f"{name} cache on {shape} is not bitwise exact; {where}"
    assert torch.equal(got.tokens, expected.tokens)


@pytest.mark.parametrize("name", EXACT)
def test_factory_returns_a_fresh_empty_cache(name: str) -> None:
    config = _strict(CONFIGS["GQA-rope-w3"])
    first, second = hf.FACTORIES[name](config), hf.FACTORIES[name](config)
    assert first is not second
    assert first.get_seq_length() == 0
    ReferenceModel(config).generate(_prompt(config, batch=1)[0], 2, cache=first)
    assert int(first.get_seq_length()) == 8, "7 prompt tokens and the first generated one were written"
    assert second.get_seq_length() == 0, "two caches from one factory share state"


def test_static_cache_reports_its_length_as_a_tensor() -> None:
    """transformers' StaticCache deviates from the protocol here (a 0-d tensor, not an int); pinned so a
    change in transformers is noticed."""
    config = _strict(NO_WINDOW["GQA-rope"])
    cache = hf.static_cache(config)
    ReferenceModel(config).generate(_prompt(config, batch=1)[0], 2, cache=cache)
    length: object = cache.get_seq_length()
    assert isinstance(length, torch.Tensor) and length.dim() == 0 and int(length) == 8


def test_sliding_factories_declare_their_window() -> None:
    for factory in (hf.sliding_window_cache, hf.static_sliding_window_cache):
        assert declaration_of(factory) == CacheDeclaration(sliding_window=hf.SLIDING_WINDOW)
        cache = factory(_strict({"sliding_window": 4}))
        assert declaration_of(cache, factory) == CacheDeclaration(sliding_window=4), "the cache declares its own"


@pytest.mark.parametrize("factory", [hf.sliding_window_cache, hf.static_sliding_window_cache])
def test_sliding_factory_implements_its_declared_window_for_a_model_without_one(factory: CacheFactory) -> None:
    cache = factory(_strict({}))
    assert declaration_of(cache).sliding_window == hf.SLIDING_WINDOW
    config = _strict({"sliding_window": hf.SLIDING_WINDOW})
    model = ReferenceModel(config)
    prompt, mask = _prompt(config)
    expected = model.generate(prompt, 10, use_cache=False, attention_mask=mask).logits
    assert torch.equal(model.generate(prompt, 10, cache=cache, attention_mask=mask).logits, expected)


def test_exact_factories_declare_nothing() -> None:
    for name in ("dynamic", "static"):
        config = _strict({})
        assert declaration_of(hf.FACTORIES[name](config), hf.FACTORIES[name]) == CacheDeclaration()


@pytest.mark.parametrize("shape", ["GQA-rope-w3", "MQA-alibi-f64-w6"])
def test_fp8_cache_is_lossy_within_its_declared_tolerance(shape: str) -> None:
    config = _strict({**CONFIGS[shape], "sliding_window": None})
    declared = declaration_of(hf.quantized_cache).lossy_atol
    assert declared == hf.FP8_ATOL
    model = ReferenceModel(config, seed=2)
    prompt, mask = _prompt(config)
    expected = model.generate(prompt, 12, use_cache=False, attention_mask=mask)
    cache = hf.quantized_cache(config)
    assert declaration_of(cache).lossy_atol == declared
    got = model.generate(prompt, 12, cache=cache, attention_mask=mask)
    assert not torch.equal(got.logits, expected.logits), "an fp8 cache that is exact is not quantizing"
    for row in range(prompt.shape[0]):  # compare up to the first token where the two generations part
        differ = (got.tokens[row] != expected.tokens[row]).nonzero()
        last = int(differ[0]) if len(differ) else got.tokens.shape[1] - 1
        error = (got.logits[row, : last + 1] - expected.logits[row, : last + 1]).abs().max().item()
        assert error <= declared, f"row {row}: fp8 logits differ by {error:.3g} > declared {declared}"


@pytest.mark.parametrize(("name", "package"), [("quanto", "optimum-quanto"), ("hqq", "hqq")])
def test_missing_quantization_backend_says_what_to_install(name: str, package: str) -> None:
    module = {"quanto": "optimum.quanto", "hqq": "hqq"}[name]
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ImportError, match=rf"pip install {package}"):
        hf.FACTORIES[name](_strict({}))


@pytest.mark.parametrize("target", ["kvverify.adapters.hf:static_cache", "kvverify.adapters.hf:dynamic_cache"])
def test_factory_is_a_module_factory_target(target: str) -> None:
    factory = load_factory(target)  # how `kvverify verify MODULE:FACTORY` resolves it
    cache = factory(ModelConfig.preset("tiny"))
    assert callable(cache.update) and cache.get_seq_length() == 0
