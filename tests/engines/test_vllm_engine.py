"""vLLM's CPU engine through its adapter: it serves the reference weights, its scheduler is observed (prefix-cache
hits, chunked prefills, preemptions), each request matches the reference within the tolerance, a corrupted KV
block is caught, and bad knobs or requests are refused by name. Runs in the engine-vllm tox env; skips elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM lives in its own environment: tox -e engine-vllm")

from kvverify.cli import main
from kvverify.engines.llama_checkpoint import write_llama_checkpoint
from kvverify.engines.vllm_check import ATOL, MODEL, RequestMismatch, Schedule, check_schedule, run_check
from kvverify.engines.vllm_engine import EngineError, EngineKnobs, EngineRequest, VllmEngine
from kvverify.reference.model import ReferenceModel


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(MODEL, seed=0)


@pytest.fixture(scope="module")
def model_dir(model: ReferenceModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_checkpoint(model, tmp_path_factory.mktemp("llama"))


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, MODEL.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def _hard_schedule() -> Schedule:
    """Three requests sharing a 64-token prefix (two whole blocks), a budget that chunks the first prefill, and
    blocks for the three prompts (five) plus one: all are admitted, and their decodes, which each cross into a
    new block, cannot all grow, so the scheduler preempts."""
    shared = _prompt(64, 0)
    requests = (
        EngineRequest(shared + _prompt(30, 1), 16),
        EngineRequest(shared + _prompt(28, 2), 16, arrival_step=4),
        EngineRequest(shared + _prompt(26, 3), 16, arrival_step=6),
    )
    knobs = EngineKnobs(block_size=32, num_blocks=7, max_num_batched_tokens=48, max_num_seqs=4, max_model_len=110)
    return Schedule(knobs, requests, (None, (0, 64), (0, 64)))


def test_one_request_matches_the_reference(model: ReferenceModel, model_dir: Path) -> None:
    prompt = _prompt(37, 5)
    with VllmEngine(model_dir, EngineKnobs(max_model_len=64)) as engine:
        result = engine.run([EngineRequest(prompt, 8)]).results[0]
    alone = model.generate(torch.tensor([prompt]), 8, use_cache=False)  # the request alone, no cache
    assert list(result.tokens) == alone.tokens[0].tolist(), "vLLM's greedy tokens differ from the reference's"
    error = float((result.logits - alone.logits[0]).abs().max())
    assert error <= ATOL, f"vLLM's logits differ from the reference's by {error:.3g} > {ATOL}"
    assert result.logits.shape == (8, MODEL.vocab_size) and result.logits.dtype == torch.float32


def test_the_scheduler_is_observed_and_every_request_holds(model: ReferenceModel, model_dir: Path) -> None:
    schedule = _hard_schedule()
    row = check_schedule(model, model_dir, schedule, ATOL)  # raises RequestMismatch on a wrong request
    first, second, third = row.results
    assert first.prefill_chunks > 0, "a 94-token prompt under a 48-token budget must be prefilled in chunks"
    cached = (second.cached_tokens, third.cached_tokens)
    assert cached == (64, 64), f"the two whole shared blocks must come from the prefix cache; got {cached}"
    assert sum(r.preemptions for r in row.results) > 0, "6 usable blocks cannot hold three growing requests"
    assert row.late_arrivals >= 1, "the later requests arrive while the first decodes"
    assert any("preempted" in event for r in row.results for _, event in r.events)
    assert 0 < row.max_abs <= ATOL


def test_a_corrupted_kv_block_is_caught(model: ReferenceModel, model_dir: Path) -> None:
    """A planted engine bug: once the request's prompt is cached, its first KV block is overwritten with another
    block's contents (as a block freed and reused while still read would be). The comparison must fail."""
    prompt = _prompt(70, 7)
    schedule = Schedule(EngineKnobs(max_model_len=90), (EngineRequest(prompt, 8),), (None,))
    engine = VllmEngine(model_dir, schedule.knobs)
    core: Any = engine._engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    scheduler, schedule_step = core.scheduler, core.scheduler.schedule

    def corrupting_schedule(*args: Any, **kwargs: Any) -> Any:
        output = schedule_step(*args, **kwargs)
        for request_id in output.num_scheduled_tokens:
            request = scheduler.requests[request_id]
            if request.num_output_tokens == 2:  # decoding, its prompt long written
                first = scheduler.kv_cache_manager.get_block_ids(request_id)[0][0]
                for cache in runner.kv_caches:  # per layer; blocks along dimension 0
                    cache[first].copy_(cache[first + 1])
        return output

    core.scheduler.schedule = corrupting_schedule
    with engine:
        run = engine.run(schedule.requests)
    expected = model.generate(torch.tensor([prompt]), 8, use_cache=False).logits[0]
    assert float((run.results[0].logits[3:] - expected[3:]).abs().max()) > 100 * ATOL, "the corruption did nothing"


def test_check_schedule_reports_the_request_and_what_the_engine_did(model_dir: Path) -> None:
    other = ReferenceModel(MODEL, seed=1)  # different weights: every request must fail
    schedule = _hard_schedule()
    with pytest.raises(RequestMismatch) as failure:
        check_schedule(other, model_dir, schedule, ATOL)
    report = str(failure.value)
    assert "request 0 of 3" in report and "what the engine did to request 0" in report
    assert "prefill chunk: tokens 0..47" in report, report
    assert "engine: prefix on, block 32 x 7, budget 48, seqs 4" in report


def test_run_check_draws_and_passes_a_few_examples() -> None:
    result = run_check(profile="dev", seed=3, max_examples=2)
    assert result.failure is None, result.failure
    assert len(result.rows) == 2


@pytest.mark.parametrize(("knobs", "message"), [
    (dict(block_size=0), "EngineKnobs.block_size must be a positive int"),
    (dict(max_num_batched_tokens=8, max_num_seqs=16), "must be at least max_num_seqs"),
    (dict(num_blocks=4, block_size=32, max_model_len=100), r"does not fit in \(num_blocks - 1\) \* block_size"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching must be a bool"),
])
def test_bad_knobs_are_refused_by_name(knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineKnobs(**knobs)


@pytest.mark.parametrize(("request_args", "message"), [
    (dict(prompt=(), max_new_tokens=1), "at least one token"),
    (dict(prompt=(1, -2), max_new_tokens=1), "non-negative int token ids"),
    (dict(prompt=(1,), max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(prompt=(1,), max_new_tokens=1, arrival_step=-1), "arrival_step must be an int >= 0"),
])
def test_bad_requests_are_refused_by_name(request_args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineRequest(**request_args)


@pytest.fixture(scope="module")
def small_engine(model_dir: Path) -> Iterator[VllmEngine]:
    with VllmEngine(model_dir, EngineKnobs(max_model_len=32)) as engine:
        yield engine


@pytest.mark.parametrize(("requests", "message"), [
    ([], "at least one EngineRequest"),
    ([EngineRequest((MODEL.vocab_size,), 1)], "outside the model's vocabulary of 256"),
    ([EngineRequest((1,) * 30, 5)], "more than max_model_len 32"),
])
def test_requests_the_engine_cannot_serve_are_refused(small_engine: VllmEngine, requests: list[EngineRequest],
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_engine.run(requests)


def test_a_missing_checkpoint_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"holds no config\.json"):
        VllmEngine(tmp_path, EngineKnobs())


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-engine", "vllm", "--max-examples", "0"]) == 2
    assert "--max-examples must be >= 1" in capsys.readouterr().err
