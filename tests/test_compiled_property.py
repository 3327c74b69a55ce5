"""The compiled property: the built-in static cache and transformers' StaticCache pass, caches that do not
declare compile=True are skipped with the reason, and the two compile mutants fail it and nothing else."""

from __future__ import annotations

import pytest
import torch

from kvverify.caches import BUILTIN_CACHES, SlidingWindowCache
from kvverify.checks import PROPERTIES, make_target
from kvverify.checks.properties.compiled import graphed_decode, greedy
from kvverify.mutants import MUTANTS
from kvverify.protocol.cache import CacheDeclaration
from kvverify.protocol.config import ModelConfig
from kvverify.runs import run_property

COMPILED = PROPERTIES["compiled"]
COMPILE_MUTANTS = sorted(name for name, mutant in MUTANTS.items() if "compile" in mutant.needs)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")


@pytest.mark.slow  # ten inductor compilations through run_property (the fast tier compiles in properties/): 13 s
def test_the_built_in_static_cache_passes() -> None:
    result = run_property(COMPILED, make_target(BUILTIN_CACHES["static"], "static"), profile="dev", seed=1,
                          max_examples=10)
    assert result.verdict == "passed" and result.examples == 10, result.detail


def test_transformers_static_cache_passes() -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters.hf import CACHES

    factory = CACHES["static"].target
    assert factory is not None

    def declared(config: ModelConfig) -> object:
        cache = factory(config)
        cache.kvverify_declaration = CacheDeclaration(compile=True)  # type: ignore[attr-defined]
        return cache

    result = run_property(COMPILED, make_target(declared, "hf-static"), profile="dev", seed=2,  # type: ignore[arg-type]
                          max_examples=10)
    assert result.verdict == "passed", result.detail


@pytest.mark.parametrize("name", ["contiguous", "paged"])
def test_a_cache_that_does_not_declare_compile_is_skipped_with_the_reason(name: str) -> None:
    result = run_property(COMPILED, make_target(BUILTIN_CACHES[name], name), profile="dev")
    assert result.verdict == "skipped" and "CacheDeclaration(compile=True)" in result.detail, result


def test_a_declared_window_is_skipped_with_the_reason() -> None:
    class Ring(SlidingWindowCache):
        kvverify_declaration = CacheDeclaration(compile=True, sliding_window=4)

    result = run_property(COMPILED, make_target(lambda config: Ring(window=4), "ring"), profile="dev")
    assert result.verdict == "skipped" and "ring" in result.detail, result


@pytest.mark.parametrize("name", COMPILE_MUTANTS)
def test_compile_mutants_fail_the_compiled_property(name: str) -> None:
    result = run_property(COMPILED, make_target(MUTANTS[name].factory, name), profile="dev", seed=0, max_examples=10)
    assert result.verdict == "failed", f"compiled did not catch {name}: {result.verdict} {result.detail[:400]}"
    assert "dynamic=False" in result.detail, result.detail[:400]


@pytest.mark.parametrize("name", COMPILE_MUTANTS)
def test_compile_mutants_pass_eager_generation(name: str) -> None:
    result = run_property(PROPERTIES["cached_equals_uncached"], make_target(MUTANTS[name].factory, name),
                          profile="dev", seed=0, max_examples=20)
    assert result.verdict == "passed", f"{name} is caught eagerly: not a compile-only bug. {result.detail[:400]}"


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize(("name", "equal"), [("static", True), ("compile_buffer_regrown", False)])
def test_a_replayed_cuda_graph_equals_eager_unless_the_buffer_moves(name: str, equal: bool) -> None:
    from kvverify import ReferenceModel

    factory = BUILTIN_CACHES["static"] if name == "static" else MUTANTS[name].factory
    config = ModelConfig.preset("tiny", numerics="fast", device="cuda", max_seq_len=32)
    model = ReferenceModel(config, seed=0)
    prompt = torch.randint(0, config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(0)).cuda()
    expected = model.generate(prompt, 20)
    try:
        cache = factory(config)
        replayed = greedy(model, cache, prompt, 20, graphed_decode(model, cache))
    except RuntimeError:  # a reallocation cannot even be captured (it synchronises): also a failure to replay
        assert not equal, f"{name} could not be captured in a CUDA graph"
        return
    same = bool(torch.allclose(replayed.logits, expected.logits, atol=1e-4, rtol=0))
    assert same == equal, f"{name}: replay {'differs from' if equal else 'equals'} eager"
