from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch

from kvverify.caches import ContiguousCache
from kvverify.engine.decode import DecodeStep
from kvverify.profiling import timing
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel


def test_uncached_timing_leaves_out_the_first_call() -> None:
    calls: list[int] = []

    def step(tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        calls.append(tokens.shape[1])
        if len(calls) == 1:  # a cold first call, as a new shape's packed weights and tables make it
            import time

            time.sleep(0.2)
        return tokens

    seconds = timing.time_uncached(step, torch.zeros(1, 5, dtype=torch.long), repeats=2)
    assert calls == [5, 5, 5], f"expected one untimed warm-up and two timed calls; got {len(calls)} calls"
    assert seconds < 0.1, f"the cold first call leaked into the median: {seconds:.3f} s"


@pytest.mark.parametrize(("numerics", "decoded"), [("fast", [4, 5]), ("strict", [])])
def test_reference_step_decodes_one_cached_token_with_the_engine(numerics: str, decoded: list[int]) -> None:
    config = ModelConfig.preset("tiny", numerics=numerics)
    model = ReferenceModel(config)
    tokens = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    class Counting(DecodeStep):
        def __call__(self, tokens: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
            calls.append(start)
            return super().__call__(tokens, cache, start)

    with mock.patch.object(timing, "DecodeStep", Counting):
        step = timing.reference_step(model)
    timed = timing.time_cached(step, ContiguousCache(), tokens, context=4)
    assert timed.step_s > 0
    step(tokens, None, 0)  # uncached: the model's forward
    assert calls == decoded, f"{numerics}: expected the engine at slots {decoded} only; it ran at {calls}"


def test_cached_timing_needs_context_and_steps() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        timing.time_cached(lambda t, c, s: t, None, torch.zeros(1, 4, dtype=torch.long), context=4)


def test_ratio_is_the_median_of_per_round_ratios() -> None:
    ratio = timing.Ratio(first_s=(1.0, 2.0, 9.0), second_s=(2.0, 2.0, 10.0))
    assert ratio.ratio == pytest.approx(0.9)
    assert ratio.first_median_s == 2.0 and ratio.second_median_s == 2.0


def test_generate_ratio_refuses_to_time_different_work() -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters.hf import dynamic_cache
    from kvverify.adapters.hf.llama import to_llama
    from kvverify.caches import ContiguousCache
    from kvverify.protocol.config import ModelConfig
    from kvverify.reference.model import ReferenceModel

    config = ModelConfig.preset("tiny", numerics="fast")
    ours, other = ReferenceModel(config, seed=0), ReferenceModel(config, seed=1)
    prompt = torch.randint(0, config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))

    def ratio_against(model: ReferenceModel) -> timing.Ratio | None:
        llama = to_llama(model, attn_implementation="sdpa")
        return timing.generate_ratio(
            ours, llama, ContiguousCache, lambda: dynamic_cache(config), prompt, 8, rounds=1
        )

    assert ratio_against(ours) is not None, "the same weights choose the same tokens: the ratio must be timed"
    assert ratio_against(other) is None, "other weights choose other tokens: their timings are not comparable"
