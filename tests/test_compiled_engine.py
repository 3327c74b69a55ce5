"""The compiled decode engine (kvverify.engine.compiled, kvverify.engine.graphs) against the eager step."""

from __future__ import annotations

import pytest
import torch

from kvverify import ContiguousCache, ModelConfig, ReferenceModel, StaticCache
from kvverify.engine.compiled import CompileCounter, CompiledDecoder, PositionStep, compile_step
from kvverify.engine.decode import DecodeStep
from kvverify.engine.graphs import GraphedStep

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")
FAST = ModelConfig.preset("tiny", numerics="fast", dtype=torch.float64, max_seq_len=40)


def _prefilled(config: ModelConfig, cache: object, length: int = 6) -> tuple[ReferenceModel, torch.Tensor]:
    model = ReferenceModel(config, seed=1)
    prompt = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    model(prompt.to(config.device), cache=cache)  # type: ignore[arg-type]
    return model, prompt


@pytest.mark.parametrize("positional", ["rope", "learned", "none"])
@pytest.mark.parametrize("window", [None, 3])
def test_position_step_equals_the_eager_step(positional: str, window: int | None) -> None:
    config = FAST.replace(positional=positional, sliding_window=window)
    static, eager_cache = StaticCache.from_config(config), StaticCache.from_config(config)
    model, _ = _prefilled(config, static)
    _prefilled(config, eager_cache)
    step, eager = PositionStep(model.weights()), DecodeStep(model.weights())
    token = torch.tensor([[3], [7]])
    for position in range(6, 12):
        got = step.at(token, static, torch.tensor([position]))
        want = eager(token, eager_cache, position)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"position {position}, {positional}, W={window}")
        token = want.argmax(-1, keepdim=True)


def test_position_step_takes_a_cache_that_returns_exactly_what_it_holds() -> None:
    contiguous, eager_cache = ContiguousCache(), ContiguousCache()
    model, _ = _prefilled(FAST, contiguous)
    _prefilled(FAST, eager_cache)
    token = torch.tensor([[1], [2]])
    got = PositionStep(model.weights()).at(token, contiguous, torch.tensor([6]))
    torch.testing.assert_close(got, DecodeStep(model.weights())(token, eager_cache, 6), rtol=0, atol=1e-12)


def test_compiled_static_cache_keeps_one_graph_and_its_length() -> None:
    cache = StaticCache.from_config(FAST)
    model, _ = _prefilled(FAST, cache)
    counter = CompileCounter("eager")
    torch._dynamo.reset()
    decode = compile_step(PositionStep(model.weights()).at, counter)
    position, token = torch.tensor([6]), torch.tensor([[4], [5]])
    for _ in range(8):
        token = decode(token, cache, position).argmax(-1, keepdim=True)
        position += 1
    assert counter.graphs <= 2, f"{counter.graphs} graphs over 8 steps: the static cache makes the step recompile"
    assert cache.get_seq_length() == 14, "lengths written inside the compiled step are lost"
    cache.crop(10)
    assert cache.get_seq_length() == 10 and cache.get_seq_length(1) == 10
    cache.reset()
    assert cache.get_seq_length() == 0


def test_compiled_decoder_generates_what_the_model_does() -> None:
    model = ReferenceModel(FAST, seed=2)
    prompt = torch.randint(0, FAST.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    decoder = CompiledDecoder(model, max_len=20, batch_size=2, backend="eager")
    expected = model.generate(prompt, 12)
    for _ in range(2):  # the second call reuses the compiled step and the cache's buffers
        tokens, logits = decoder.generate(prompt, 12)
        assert torch.equal(tokens, expected.tokens)
        torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-10)
    assert decoder.counter.graphs <= 2, f"{decoder.counter.graphs} graphs for two generations of one shape"


def test_compiled_decoder_says_what_does_not_fit() -> None:
    decoder = CompiledDecoder(ReferenceModel(FAST), max_len=10, backend="eager")
    with pytest.raises(ValueError, match="does not fit this decoder"):
        decoder.generate(torch.zeros(1, 8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        CompiledDecoder(ReferenceModel(FAST), max_len=41)
    with pytest.raises(ValueError, match="fast numerics"):
        CompiledDecoder(ReferenceModel(FAST.replace(numerics="strict")), max_len=10)


def test_inductor_compiles_the_step_to_the_same_tokens() -> None:
    config = FAST.replace(dtype=torch.float32)
    model = ReferenceModel(config, seed=0)
    prompt = torch.randint(0, config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    tokens, logits = CompiledDecoder(model, max_len=16).generate(prompt, 10)
    expected = model.generate(prompt, 10)
    assert torch.equal(tokens, expected.tokens)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=2e-5)


def test_graphed_step_copies_into_its_static_inputs_on_the_cpu() -> None:
    cache = StaticCache.from_config(FAST)
    model, _ = _prefilled(FAST, cache)
    step = PositionStep(model.weights())
    token, position = torch.tensor([[1], [2]]), torch.tensor([6])
    graphed = GraphedStep(step.at, cache, token, position)
    assert graphed.graph is None, "no CUDA graph on a CPU"
    other = StaticCache.from_config(FAST)
    _prefilled(FAST, other)
    torch.testing.assert_close(graphed(token, position), step.at(token, other, position), rtol=0, atol=0)
    with pytest.raises(ValueError, match="capture another for that batch"):
        graphed(torch.tensor([[1]]), position)


@pytest.mark.cuda
@CUDA
def test_graph_replay_equals_eager_on_cuda() -> None:
    config = FAST.replace(device="cuda", dtype=torch.float32)
    model = ReferenceModel(config, seed=2)
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3)).cuda()
    expected = model.generate(prompt, 16)
    decoder = CompiledDecoder(model, max_len=24, batch_size=2)  # inductor, then a CUDA graph
    tokens, logits = decoder.generate(prompt, 16)
    assert decoder.compiled.graphed, "no CUDA graph was captured"
    assert torch.equal(tokens, expected.tokens)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-4)
