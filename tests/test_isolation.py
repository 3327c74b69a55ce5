"""Isolation beyond ``kvverify verify``: ``check_cache(isolate=True)``, the plugin's ``--kv-isolate`` and
``kvverify long-context`` run the cache in the same child process, in a process group killed whole, and keep the
verdicts reached before a child dies (hostile targets in tests/targets/hostile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvverify.caches import ContiguousCache
from kvverify.runs import CacheCheckFailed, check_cache, factory_spec

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
    grandchild = int(pidfile.read_text())
    for _ in range(50):  # the kill is sent; the kernel may take a moment to reap
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return
        if _zombie(grandchild):
            return
        time.sleep(0.1)
    os.kill(grandchild, 9)
    pytest.fail(f"the process the cache started (pid {grandchild}) outlived the run")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_the_plugin_isolated_fails_the_item_and_the_run_goes_on(pytester: pytest.Pytester,
                                                                 targets_importable: None) -> None:
    pytester.makepyfile(test_other="def test_still_runs():\n    assert True\n")
    result = pytester.runpytest_subprocess(
        "--kv-cache=targets.hostile:os_exit_in_update", "--kv-isolate", "--kv-profile=dev", "--kv-max-examples=3",
        "--kv-seed=1", "-k", "cached_equals_uncached or still_runs", "-p", "no:randomly",
    )
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "ended with exit code 0" in text and "--kv-isolate" in text


@pytest.mark.slow
def test_long_context_runs_the_target_in_a_child(targets_importable: None) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "kvverify", "long-context", "targets.hostile:os_exit_in_update",
                          "--length", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "in a child process" in run.stdout and "ended with exit code 0" in run.stdout
