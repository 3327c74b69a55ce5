"""vLLM's CPU engine through its adapter: it serves the reference weights, its scheduler is observed (prefix-cache
hits, chunked prefills, preemptions), each request matches the reference within the tolerance, a corrupted KV
block and wrong weights are caught with a report, and ``kvverify verify-engine vllm`` passes drawn schedules.
Runs in the engine-vllm tox env; skips elsewhere (tests/test_vllm_adapter.py covers the adapter without vLLM)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM lives in its own environment: tox -e engine-vllm")

from kvverify.cli import main
from kvverify.engines.llama_checkpoint import write_llama_checkpoint
from kvverify.engines.properties import EngineMismatch, check_matches_alone
from kvverify.engines.runner import run_engine_suite
from kvverify.engines.schedule import EngineKnobs, ModelSpec, RequestSpec, Schedule
from kvverify.engines.vllm_engine import ATOL, MODEL, VllmEngine
from kvverify.reference.model import ReferenceModel

ENGINE = VllmEngine()
SPEC = ModelSpec(layers="full", attention="native", vocab=MODEL.vocab_size)


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, MODEL.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


#: Three requests sharing a 64-token prefix (two whole blocks), a budget that chunks the first prefill, and blocks
#: for the three prompts (five) plus vLLM's null block: all are admitted, and their decodes, which each cross into
#: a new block, cannot all grow, so the scheduler preempts.
SHARED = _prompt(64, 0)
HARD = Schedule(SPEC, EngineKnobs(page_size=32, num_blocks=7, max_batch_tokens=48, max_running=4), (
    RequestSpec(SHARED + _prompt(30, 1), 16),
    RequestSpec(SHARED + _prompt(28, 2), 16, arrival=4),
    RequestSpec(SHARED + _prompt(26, 3), 16, arrival=6),
))


def test_one_request_matches_the_reference_generating_it_alone() -> None:
    prompt = _prompt(37, 5)
    run = ENGINE.run(Schedule(SPEC, EngineKnobs(page_size=32, num_blocks=8, max_batch_tokens=64), (
        RequestSpec(prompt, 8),)))
    assert run.error is None, run.error
    got = run.outputs["r0"]
    alone = ReferenceModel(MODEL, seed=0).generate(torch.tensor([prompt]), 8, use_cache=False)
    assert got.tokens == alone.tokens[0].tolist(), "vLLM's greedy tokens differ from the reference's"
    logits = torch.stack([row for row in got.logits if row is not None])  # (8, vocab)
    assert logits.shape == (8, MODEL.vocab_size) and logits.dtype == torch.float32
    error = float((logits - alone.logits[0]).abs().max())
    assert 0 < error <= ATOL, f"vLLM's logits differ from the reference's by {error:.3g} (tolerance {ATOL})"


def test_the_scheduler_is_observed_and_every_request_holds() -> None:
    run = check_matches_alone(ENGINE, HARD)  # raises EngineMismatch on a wrong request
    assert run.reached == {"preempted", "shared", "chunked"}, run.reached
    events = [event for step in run.steps for event in step.events]
    assert "r0 prefill chunk: tokens 0..47 of 94, blocks [1, 2]" in events, events[:5]
    assert any(e.startswith("r1 read tokens 0..63 from the prefix cache") for e in events), "two shared blocks"
    assert any(e.endswith("preempted: its blocks freed, to be recomputed") for e in events)
    assert sum(e.startswith("r0 chose token #") for e in events) == 16
    assert run.largest_difference is not None and 0 < run.largest_difference <= ATOL


def _corrupting(original: Any) -> Any:
    """``VllmEngine._start`` whose engine overwrites a request's first KV block with the next block's contents
    once it has decoded two tokens (as a block freed and reused while still read would be)."""

    def start(self: VllmEngine, vllm: Any, schedule: Schedule) -> Any:
        llm = original(self, vllm, schedule)
        core = llm.llm_engine.engine_core.engine_core
        caches = core.model_executor.driver_worker.worker.model_runner.kv_caches  # per layer; blocks along dim 0
        scheduler, schedule_step = core.scheduler, core.scheduler.schedule

        def corrupting_schedule(*args: Any, **kwargs: Any) -> Any:
            output = schedule_step(*args, **kwargs)
            for request_id in output.num_scheduled_tokens:
                if scheduler.requests[request_id].num_output_tokens == 2:
                    first = scheduler.kv_cache_manager.get_block_ids(request_id)[0][0]
                    for cache in caches:
                        cache[first].copy_(cache[first + 1])
            return output

        scheduler.schedule = corrupting_schedule
        return llm

    return start


def test_a_corrupted_kv_block_is_caught_with_the_request_the_token_and_the_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VllmEngine, "_start", _corrupting(VllmEngine._start))
    schedule = Schedule(SPEC, EngineKnobs(page_size=32, num_blocks=8, max_batch_tokens=64),
                        (RequestSpec(_prompt(70, 7), 8),))
    with pytest.raises(EngineMismatch) as failure:
        check_matches_alone(ENGINE, schedule)
    report = str(failure.value)
    assert report.startswith("r0, token #") and "logits differ beyond atol=2e-05" in report, report
    assert "what the engine did around it:" in report and "r0 decode: token" in report


def test_wrong_weights_fail_at_the_first_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = VllmEngine()
    other = write_llama_checkpoint(ReferenceModel(MODEL, seed=1), tmp_path / "other")
    monkeypatch.setattr(engine, "checkpoint", lambda model: other)  # serves seed 1's weights as seed 0's
    with pytest.raises(EngineMismatch, match=r"r0, token #0: logits differ beyond atol=2e-05") as failure:
        check_matches_alone(engine, HARD)
    assert "step 1: r0 past 48 +46\n    r0 prefill: tokens 48..93, blocks [1, 2, 3]" in str(failure.value)


def test_a_small_hypothesis_run_passes_and_counts_the_hard_paths() -> None:
    result = run_engine_suite(ENGINE, profile="dev", seed=3, max_examples=2)
    assert result.suite.ok, "\n".join(r.detail for r in result.suite.failures)
    assert result.examples == 2 and result.paths == ("preempted", "shared", "chunked")
    assert result.largest_difference is not None and result.largest_difference <= ATOL


def test_the_command_exits_0_with_its_tables_and_junit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "vllm.xml"
    assert main(["verify-engine", "vllm", "--profile", "dev", "--max-examples", "2", "--seed", "1",
                 "--junitxml", str(report)]) == 0
    out = capsys.readouterr().out
    assert "kvverify verify-engine: vLLM 0.32.0" in out and "within 2e-05 of the strict reference" in out
    assert "matches_alone" in out and "hard path" in out and "largest logit difference" in out
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "1" and suite.get("failures") == "0"
