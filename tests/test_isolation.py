"""Isolation beyond ``kvverify verify``: ``check_cache(isolate=True)``, the plugin's ``--kv-isolate`` and
``kvverify long-context`` run the cache in the same child process, in a process group killed whole, and keep the
verdicts reached before a child dies (hostile targets in tests/targets/hostile.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvverify.caches import ContiguousCache
from kvverify.checks import TargetError
from kvverify.runs import CacheCheckFailed, SuiteResult, check_cache, factory_spec, run_isolated

TESTS = Path(__file__).parent
ROOT = TESTS.parent

pytest_plugins = ["pytester"]


@pytest.fixture
def targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def test_a_factory_the_child_cannot_import_is_refused_with_what_to_pass() -> None:
    assert factory_spec("paged") == "paged"
    assert factory_spec(ContiguousCache.from_config) == "kvverify.caches.contiguous:ContiguousCache.from_config"
    with pytest.raises(ValueError, match=r"cannot be found by its module and name .* Pass it as \"MODULE:FACTORY\""):
        factory_spec(lambda config: ContiguousCache())


def test_isolate_takes_no_database_object() -> None:
    from hypothesis.database import InMemoryExampleDatabase

    with pytest.raises(ValueError, match="pass it as a directory or redis:// URL"):
        check_cache("contiguous", isolate=True, database=InMemoryExampleDatabase(), properties="reset")


FOUR = ["first", "second", "third", "fourth"]


def _dying(properties: list[str] = FOUR, time_limit: float | None = 5.0, **how: Any) -> SuiteResult:
    """run_isolated over a child that speaks as the suite does and dies as ``how`` says (targets/dying_work.py)."""
    from targets.dying_work import work

    return run_isolated(functools.partial(work, **how), target="dying", properties=properties,
                        time_limit=time_limit, reproduce="kvverify verify dying")


def _verdicts(result: SuiteResult) -> dict[str, str]:
    return {r.name: r.verdict for r in result.results}


def test_a_death_in_the_third_property_keeps_the_two_verdicts_before_it(targets_importable: None) -> None:
    result = _dying(die=("in:third",), properties=FOUR[:3])
    assert _verdicts(result) == {"first": "passed", "second": "passed", "third": "failed"}
    third = result.results[2]
    assert "ended with exit code 3 during property third" in third.detail, third.detail
    assert third.reproduce == "kvverify verify dying --property third"


@pytest.mark.slow
def test_a_death_in_the_third_property_leaves_the_fourth_to_a_new_child(targets_importable: None) -> None:
    result = _dying(die=("in:third",), how="kill")
    assert _verdicts(result) == {"first": "passed", "second": "passed", "third": "failed", "fourth": "passed"}
    assert "was killed by signal 9 (SIGKILL) during property third" in result.results[2].detail


def test_a_death_between_two_properties_fails_the_next_and_keeps_the_rest(targets_importable: None) -> None:
    result = _dying(die=("after:second",), properties=FOUR[:3])
    assert _verdicts(result) == {"first": "passed", "second": "passed", "third": "failed"}
    detail = result.results[2].detail
    assert "during the suite's own work after property second finished" in detail, detail
    assert "Property third had not begun" in detail


@pytest.mark.slow
def test_a_death_after_the_last_verdict_changes_no_verdict(targets_importable: None) -> None:
    result = _dying(die=("after:third",), properties=FOUR[:3])
    assert _verdicts(result) == {"first": "passed", "second": "passed", "third": "passed"}


@pytest.mark.slow
def test_a_new_child_that_dies_before_its_first_property_fails_the_rest(targets_importable: None,
                                                                       tmp_path: Path) -> None:
    result = _dying(die=("in:second", "setup"), marker=str(tmp_path / "started"))
    assert _verdicts(result) == {"first": "passed", "second": "failed", "third": "failed", "fourth": "failed"}
    assert "during the suite's setup" in result.results[3].detail
    assert "Property fourth had not begun" in result.results[3].detail


def test_a_first_child_that_dies_before_any_property_is_an_unusable_target(targets_importable: None,
                                                                          tmp_path: Path) -> None:
    (tmp_path / "started").touch()
    with pytest.raises(TargetError, match="ended with exit code 3 during the suite's setup"):
        _dying(die=("setup",), marker=str(tmp_path / "started"))


def test_a_process_started_by_a_child_that_hangs_dies_with_it(targets_importable: None, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    result = _dying(die=("in:second",), how="hang", properties=FOUR[:2], time_limit=0.1, pidfile=str(pidfile))
    assert _verdicts(result) == {"first": "passed", "second": "failed"}
    assert "did not finish within the time limit of 0.1 s" in result.results[1].detail
    _assert_gone(int(pidfile.read_text().split()[1]))


@pytest.mark.slow
def test_a_process_started_by_a_child_that_ends_well_dies_with_it(targets_importable: None, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    result = _dying(properties=FOUR[:1], pidfile=str(pidfile))
    assert _verdicts(result) == {"first": "passed"}
    _assert_gone(int(pidfile.read_text().split()[1]))


def _assert_gone(pid: int) -> None:
    """The process ``pid`` ends within 5 s (killed; the kernel may take a moment to reap it)."""
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _zombie(pid):
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail(f"the process the cache started (pid {pid}) outlived the run")


_HANGS_IN_A_CHILD = """
import functools, sys
from targets.dying_work import work
from kvverify.runs import run_isolated
run_isolated(functools.partial(work, die=("in:first",), how="hang", pidfile=sys.argv[1]), target="dying",
             properties=["first"], time_limit=None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_parent_that_is_ended_takes_its_child_with_it(ending: signal.Signals, tmp_path: Path) -> None:
    """The child leads its own group, out of reach of a signal sent to the parent's: SIGTERM to the parent kills
    the child's group (the child and what it started) before the parent ends; SIGKILL, the child (Linux)."""
    pidfile = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    parent = subprocess.Popen([sys.executable, "-c", _HANGS_IN_A_CHILD, str(pidfile)], env=env)
    try:
        for _ in range(600):
            if pidfile.exists() or parent.poll() is not None:
                break
            time.sleep(0.1)
        child, grandchild = (int(pid) for pid in pidfile.read_text().split())
        time.sleep(0.5)  # the child reaches its hang
        parent.send_signal(ending)
        assert parent.wait(30) == -ending
        _assert_gone(child)
        if ending == signal.SIGTERM:
            _assert_gone(grandchild)
    finally:
        parent.kill()
        for pid in (child, grandchild) if pidfile.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_check_cache_isolated_keeps_the_verdicts_reached_before_the_child_died(targets_importable: None) -> None:
    with pytest.raises(CacheCheckFailed) as failed:
        check_cache("targets.hostile:os_exit_in_reset", isolate=True, profile="dev", max_examples=5, seed=0,
                    properties=["cached_equals_uncached", "reset"])
    verdicts = {r.name: r for r in failed.value.result.results}
    assert verdicts["cached_equals_uncached"].verdict == "passed"
    assert verdicts["reset"].verdict == "failed"
    assert "ended with exit code 0" in verdicts["reset"].detail
    assert "isolate=True" in (verdicts["reset"].reproduce or "")


@pytest.mark.slow
def test_verify_prints_the_verdicts_before_a_death_in_the_third_property() -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1"}
    order = ["cached_equals_uncached", "crop", "reset", "batch_independence"]
    run = subprocess.run([sys.executable, "-m", "kvverify", "verify", "targets.hostile:os_exit_in_reset",
                          "--profile", "dev", "--max-examples", "3", "--seed", "0",
                          *(part for name in order for part in ("--property", name))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stdout + run.stderr
    rows = {line.split()[1]: line.split()[3] for line in run.stdout.splitlines()
            if line.startswith("targets.hostile:os_exit_in_reset ")}
    assert rows == {"cached_equals_uncached": "PASS", "crop": "PASS", "reset": "FAIL",
                    "batch_independence": "PASS"}, run.stdout
    assert "ended with exit code 0 during one example of reset" in run.stdout


@pytest.mark.slow
def test_check_cache_isolated_passes_a_correct_cache_by_name() -> None:
    result = check_cache("paged", isolate=True, profile="dev", max_examples=3, seed=0, properties="reset")
    assert [r.verdict for r in result.results] == ["passed"]


@pytest.mark.slow
def test_a_process_the_cache_started_dies_with_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "KVVERIFY_TEST_PIDFILE": str(pidfile), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "kvverify", "verify", "targets.hostile:grandchild_then_hang",
                          "--profile", "ci", "--max-examples", "3", "--time-limit", "1", "--property",
                          "cached_equals_uncached", "--seed", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stdout + run.stderr
    _assert_gone(int(pidfile.read_text()))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_the_plugin_isolated_fails_the_item_and_the_run_goes_on(pytester: pytest.Pytester,
                                                                 targets_importable: None) -> None:
    pytester.makepyfile(test_other="def test_still_runs():\n    assert True\n\n\n"
                        "def test_fixture_target(kv_target):\n    assert 'reset' in kv_target.capabilities\n")
    result = pytester.runpytest_subprocess(
        "--kv-cache=targets.hostile:os_exit_in_update", "--kv-isolate", "--kv-profile=dev", "--kv-max-examples=3",
        "--kv-seed=1", "-k", "cached_equals_uncached or still_runs or fixture_target", "-p", "no:randomly",
    )
    result.assert_outcomes(passed=2, failed=1)
    text = result.stdout.str()
    assert "ended with exit code 0" in text and "--kv-isolate" in text


@pytest.mark.slow
def test_the_plugin_isolated_probes_the_target_in_a_child(pytester: pytest.Pytester,
                                                          targets_importable: None) -> None:
    ended = pytester.runpytest_subprocess("--kv-cache=targets.hostile:os_exit_in_factory", "--kv-isolate",
                                          "-p", "no:randomly", timeout=120)
    assert ended.ret == pytest.ExitCode.USAGE_ERROR
    ended.stderr.fnmatch_lines(["*os_exit_in_factory*ended with exit code 3*"])
    # a non-daemon thread the factory leaves behind would keep pytest's process alive at its end
    threads = pytester.runpytest_subprocess("--kv-cache=targets.hostile:thread_in_factory", "--kv-isolate",
                                            "--kv-profile=dev", "--kv-max-examples=2", "-k", "reset",
                                            "-p", "no:randomly", timeout=120)
    threads.assert_outcomes(passed=1)


@pytest.mark.slow
def test_long_context_runs_the_target_in_a_child(targets_importable: None) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "kvverify", "long-context", "targets.hostile:os_exit_in_update",
                          "--length", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "in a child process" in run.stdout and "ended with exit code 0" in run.stdout


@pytest.mark.slow
def test_long_context_never_imports_the_target_itself() -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "kvverify", "long-context", "targets.exits_on_import:make_cache",
                          "--length", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "ended with exit code 5" in run.stderr
