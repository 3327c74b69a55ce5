"""``kvverify verify-engine transformers``: transformers' continuous batching, request by request, against each
request generated alone with no cache, bit for bit. Fixed schedules that reach sharing, chunked prefill,
preemption and sliding layers pass on the unpatched engine and fail with a planted bug; a small Hypothesis run
passes; the command exits 0, 1 and 2 as ``kvverify verify`` does and writes JUnit and a repro script."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from kvverify.cli import main
from kvverify.engines import mutants
from kvverify.engines.properties import (
    EngineMismatch,
    NeighbourCase,
    check_independent_of_neighbours,
    check_matches_alone,
)
from kvverify.engines.repro import write_engine_repro
from kvverify.engines.runner import run_engine_suite
from kvverify.engines.schedule import EngineKnobs, ModelSpec, RequestSpec, Schedule
from kvverify.engines.transformers_cb import TransformersEngine

ENGINE = TransformersEngine()
STEM = tuple((5 * i + 3) % 96 for i in range(16))


def fresh(length: int, salt: int) -> tuple[int, ...]:
    return tuple((salt * 11 + 7 * i) % 96 for i in range(length))


#: Full layers, block sharing: r1 and r3 share r0's first pages (r3 differs in the last token of page 2), chunks
#: of 6 tokens start mid-page.
SHARING = Schedule(ModelSpec(), EngineKnobs(page_size=4, num_blocks=9, max_batch_tokens=6, block_sharing=True), (
    RequestSpec(STEM[:13], 6), RequestSpec((*STEM[:8], 1, 2, 3), 5, arrival=2), RequestSpec(fresh(20, 1), 6),
    RequestSpec((*STEM[:7], 9, 9, 9, 9), 4, arrival=3)))
#: Three requests in 8 blocks of 4 tokens: the engine soft-resets one to let the others finish.
PREEMPTION = Schedule(ModelSpec(), EngineKnobs(page_size=4, num_blocks=8, max_batch_tokens=6, block_sharing=False), (
    RequestSpec(fresh(9, 1), 8), RequestSpec(fresh(10, 2), 8), RequestSpec(fresh(7, 3), 8, arrival=1)))
#: Every layer sliding (window 5, sdpa) and mixed sliding and full (window 6, paged|eager), past the window.
SLIDING = Schedule(ModelSpec(layers="sliding", window=5, attention="sdpa"),
                   EngineKnobs(page_size=4, num_blocks=12, max_batch_tokens=5),
                   (RequestSpec(fresh(12, 2), 6), RequestSpec(fresh(9, 3), 6, arrival=1)))
MIXED = Schedule(ModelSpec(layers="mixed", window=6),
                 EngineKnobs(page_size=4, num_blocks=10, max_batch_tokens=7, scheduler="prefill_first"),
                 (RequestSpec(fresh(15, 4), 5), RequestSpec(fresh(3, 5), 7, arrival=2), RequestSpec(fresh(10, 6), 4)))


@pytest.mark.parametrize(("schedule", "paths"), [
    (SHARING, {"shared", "chunked"}), (PREEMPTION, {"preempted", "chunked"}),
    (SLIDING, {"sliding", "chunked"}), (MIXED, {"sliding", "chunked"}),
], ids=["sharing", "preemption", "sliding", "mixed"])
def test_the_unpatched_engine_matches_each_request_alone(schedule: Schedule, paths: set[str]) -> None:
    run = check_matches_alone(ENGINE, schedule)
    assert paths <= run.reached, f"the fixed schedule should reach {paths}; it reached {run.reached}"


def test_requests_arrive_before_their_step_while_others_decode() -> None:
    run = check_matches_alone(ENGINE, PREEMPTION)  # r2 arrives before step 1
    first = {rid: min(s.index for s in run.steps if any(r == rid for r, _, _ in s.batch)) for rid in ("r0", "r2")}
    assert first["r0"] == 0 and first["r2"] >= 1, f"first steps: {first}"
    late = Schedule(ModelSpec(), EngineKnobs(), (RequestSpec(fresh(5, 1), 6), RequestSpec(fresh(4, 2), 2, arrival=3)))
    run = check_matches_alone(ENGINE, late)
    assert [[rid for rid, _, _ in s.batch] for s in run.steps[:4]] == [["r0"], ["r0"], ["r0"], ["r0", "r1"]]


def test_a_request_does_not_depend_on_its_neighbours_unless_a_bug_makes_it() -> None:
    case = NeighbourCase(PREEMPTION, _with(PREEMPTION.requests[1]), 1, 1)
    check_independent_of_neighbours(ENGINE, case)
    with mutants.get_mutant("preempted_resumes_stale").planted(), pytest.raises(EngineMismatch, match="r1"):
        check_independent_of_neighbours(ENGINE, case)  # preempted in the first schedule only


def _with(request: RequestSpec) -> Schedule:
    """A second schedule holding ``request`` as r1, among other neighbours and other knobs."""
    return Schedule(ModelSpec(), EngineKnobs(page_size=5, num_blocks=20, max_batch_tokens=3),
                    (RequestSpec(fresh(14, 9), 3), request, RequestSpec(fresh(4, 8), 2, arrival=1)))


@pytest.mark.parametrize(("name", "schedule"), [
    ("shared_block_freed_while_read", SHARING), ("prefix_hash_ignores_last_token", SHARING),
    ("sliding_wraps_early", SLIDING), ("chunk_written_at_page_start", MIXED),
    ("chunk_repeats_boundary_token", SLIDING), ("preempted_resumes_stale", PREEMPTION),
])
def test_a_planted_engine_bug_fails_with_the_request_the_token_and_the_steps(name: str, schedule: Schedule) -> None:
    with mutants.get_mutant(name).planted(), pytest.raises(EngineMismatch) as failure:
        check_matches_alone(ENGINE, schedule)
    report = str(failure.value)
    assert "the engine raised" in report or ("token #" in report and "what the engine did around it" in report)
    check_matches_alone(ENGINE, schedule)  # and the mutant is gone once its block ends


def test_a_small_hypothesis_run_passes_and_counts_the_hard_paths() -> None:
    result = run_engine_suite(ENGINE, profile="dev", seed=3, max_examples=6)
    assert result.suite.ok, "\n".join(r.detail for r in result.suite.failures)
    assert [r.examples for r in result.suite.results] == [6, 2]
    assert result.examples == 6 and set(result.reached) <= {"preempted", "shared", "chunked", "sliding"}


def _always_wrong(original: Any) -> Any:
    def update_and_check_completion(self: Any, token_id: int, logprob: float | None) -> bool:
        return bool(original(self, (token_id + 1) % 96, logprob))
    return update_and_check_completion


@pytest.fixture
def off_by_one_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A mutant that records every chosen token plus one: every schedule fails, and shrinks in a few steps."""
    planted = mutants.EngineMutant("token_plus_one", "every token is recorded plus one", "requests", "RequestState",
                                   "update_and_check_completion", _always_wrong)
    monkeypatch.setitem(mutants.MUTANTS, planted.name, planted)
    yield planted.name


def test_the_command_exits_0_and_writes_junit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "engine.xml"
    assert main(["verify-engine", "transformers", "--profile", "dev", "--max-examples", "3", "--seed", "1",
                 "--junitxml", str(report)]) == 0
    out = capsys.readouterr().out
    assert "matches_alone" in out and "hard path" in out and "preempted" in out
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "0"


def test_the_command_exits_1_with_a_report_junit_and_a_repro_script(
        tmp_path: Path, off_by_one_token: str, capsys: pytest.CaptureFixture[str]) -> None:
    report, script = tmp_path / "engine.xml", tmp_path / "repro.py"
    assert main(["verify-engine", "transformers", "--max-examples", "2", "--seed", "0", "--property", "matches_alone",
                 "--mutant", off_by_one_token, "--junitxml", str(report), "--repro-script", str(script),
                 "--no-shrink"]) == 1
    out = capsys.readouterr().out
    assert "r0, token #0: the engine chose" in out and "from the same logits as r0 generated alone" in out
    assert "schedule (not shrunk):" in out and "what the engine did around it:\nstep 0: r0 past 0 +" in out
    assert f"reproduce: kvverify verify-engine transformers --profile ci --seed 0 --max-examples 2 --mutant " \
           f"{off_by_one_token} --property matches_alone" in out
    assert ET.parse(report).getroot().find("testsuite/testcase/failure") is not None
    assert "CASE = Schedule(model=ModelSpec(" in script.read_text()


def test_a_repro_script_exits_1_while_the_bug_is_there(tmp_path: Path) -> None:
    script = write_engine_repro(tmp_path / "repro.py", engine="transformers", prop="matches_alone", case=SLIDING,
                                mutant="sliding_wraps_early")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: r0, token #" in done.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["vllm-typo"], "unknown engine 'vllm-typo'; expected one of: transformers, vllm"),
    (["transformers", "--mutant", "nope"], "unknown --mutant 'nope'; expected one of: shared_block_freed_while_read"),
    (["transformers", "--device", "cuda:0"], "--device cuda:0"),
    (["transformers", "--max-examples", "0"], "--max-examples must be >= 1; got 0"),
    (["transformers", "--time-limit", "soon"], "--time-limit must be > 0 seconds"),
])
def test_bad_input_exits_2_with_a_clear_message(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-engine", *argv]) == 2
    assert message in capsys.readouterr().err


def _hangs(original: Any) -> Any:
    def _sample(self: Any, scores: Any, output_ids: Any) -> None:
        import time

        time.sleep(30)
    return _sample


def test_an_engine_that_hangs_fails_at_the_time_limit_unshrunk() -> None:
    hang = mutants.EngineMutant("hangs", "sampling never returns", "model_runner", "ModelRunner", "_sample", _hangs)
    result = run_engine_suite(ENGINE, profile="dev", seed=0, max_examples=3, properties=("matches_alone",),
                              patch=hang.planted, time_limit=1.0)
    [outcome] = result.suite.results
    assert outcome.verdict == "failed" and "did not finish within the time limit of 1 s" in outcome.detail
    assert "schedule (not shrunk):" in outcome.detail
