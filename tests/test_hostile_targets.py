"""Caches that end, crash or hang the process, or leave it running, cannot end, hang or fool ``kvverify verify``:
each gets a verdict naming the cause and an exit code CI reads right (targets in tests/targets/hostile.py).
The command runs as a subprocess with a timeout, so no test here can hang; a wrong option or report path is
refused before anything runs, by the command, ``check_cache`` and the plugin alike."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvverify
from kvverify.cli import main

pytestmark = pytest.mark.slow  # a child process per hostile target, each killed or timed out: 50 s of CPU

TESTS = Path(__file__).parent
ROOT = TESTS.parent
QUICK = ["--profile", "ci", "--max-examples", "3", "--time-limit", "2", "--property", "cached_equals_uncached",
         "--seed", "1"]
TIMEOUT = 240  # seconds: far past any verdict here, even on a loaded machine

pytest_plugins = ["pytester"]


def _environment() -> dict[str, str]:
    paths = [str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _verify(*argv: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvverify", "verify", *argv], cwd=ROOT, env=_environment(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("factory", "code", "expected"),
    [
        ("exit_in_update", 1, "SystemExit(0) raised by the cache's code (one example of cached_equals_uncached)"),
        ("keyboard_interrupt_in_update", 1, "KeyboardInterrupt raised by the cache's code"),
        ("os_exit_in_update", 1, "The process running the cache ended with exit code 0 during one example of "
                                 "cached_equals_uncached"),
        pytest.param("segfault_in_update", 1, "was killed by signal 11 (SIGSEGV) during one example of "
                      "cached_equals_uncached", marks=pytest.mark.skipif(sys.platform == "win32", reason="POSIX")),
        ("exit_in_factory", 2, "SystemExit(0) raised by the cache's code (target 'targets.hostile:exit_in_factory': "
                               "the factory)"),
        ("os_exit_in_factory", 2, "The process running the cache ended with exit code 3 during target "
                                  "'targets.hostile:os_exit_in_factory': the factory"),
        ("thread_in_factory", 0, "cached_equals_uncached          3   PASS"),
    ],
)
def test_a_hostile_target_gets_a_verdict_naming_the_cause(factory: str, code: int, expected: str) -> None:
    run = _verify(f"targets.hostile:{factory}", *QUICK)
    output = run.stdout + run.stderr
    assert run.returncode == code, output
    assert expected in output, output
    if code == 1:
        assert "FAIL" in run.stdout and "reproduce: kvverify verify targets.hostile:" in run.stdout, output
        assert "last case (not shrunk):" in output or "minimal case:" in output, output


def test_a_hang_that_swallows_the_interrupt_is_stopped_within_seconds_of_the_limit() -> None:
    run = _verify("targets.hostile:hang_in_update", *QUICK)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "one example of cached_equals_uncached did not finish within the time limit of 2 s" in output, output
    assert "bare `except:`" in output and "last case (not shrunk):" in output, output
    stopped = float(output.split("stopped the process running the cache after ")[1].split(" s")[0])
    assert 2 <= stopped <= 2 + 5, output  # killed at the limit plus a grace of 2 s (polled every 0.5 s)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_stops_the_whole_run_with_130_not_a_verdict() -> None:
    """The terminal's Ctrl-C reaches the parent and the child; the child ignores it, the parent stops it."""
    command = [sys.executable, "-m", "kvverify", "verify", "targets.hostile:hang_in_update", *QUICK[:-4],
               "--time-limit", "none", "--property", "cached_equals_uncached"]
    process = subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        while "retrying forever" not in process.stdout.readline():  # the child is inside the hang
            pass
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, out + err
    assert "interrupted" in err and "FAIL" not in out, out + err


@pytest.mark.parametrize("limit", ["nan", "inf", "0", "-1", "soon"])
def test_a_time_limit_that_is_not_a_positive_number_exits_2(limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "targets.plain_cache:make_cache", "--time-limit", limit]) == 2
    err = capsys.readouterr().err
    assert f"--time-limit must be > 0 seconds and finite, or none for no limit (the default is 60); got {limit}" in err


def test_a_junit_path_that_cannot_be_written_is_refused_before_running(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    assert main(["verify", "targets.plain_cache:make_cache", "--junitxml", str(tmp_path)]) == 2
    assert "is a directory; expected the path of the XML file to write" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["verify", "targets.plain_cache:make_cache", "--junitxml", str(tmp_path / "file" / "kv.xml")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert time.perf_counter() - started < 5  # refused at once: nothing ran
    assert main(["verify", "targets.plain_cache:make_cache", "--junitxml", str(tmp_path / "new" / "kv.xml"),
                 "--max-examples", "0"]) == 2
    assert not (tmp_path / "new" / "kv.xml").exists()  # the check leaves no empty report behind


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"time_limit": -1}, "time_limit must be > 0 seconds and finite, or none for no limit"),
        ({"time_limit": float("nan")}, "got nan"),
        ({"profile": "nosuch"}, "profile must be one of dev, ci, thorough; got 'nosuch'"),
        ({"properties": ["crop", "nope"]}, "where ['nope'] are unknown"),
        ({"max_examples": 0}, "max_examples must be a whole number >= 1"),
    ],
)
def test_check_cache_names_what_it_expected(options: dict[str, object], expected: str) -> None:
    from targets.plain_cache import make_cache

    with pytest.raises(ValueError) as error:
        kvverify.check_cache(make_cache, **options)  # type: ignore[arg-type]
    assert expected in str(error.value)


def test_check_cache_takes_one_property_as_a_string() -> None:
    from targets.plain_cache import make_cache

    result = kvverify.check_cache(make_cache, profile="dev", seed=1, max_examples=2, properties="reset")
    assert [r.name for r in result.results] == ["reset"]


def test_check_cache_fails_a_cache_that_calls_sys_exit() -> None:
    from targets.hostile import exit_in_update

    with pytest.raises(kvverify.CacheCheckFailed) as error:
        kvverify.check_cache(exit_in_update, profile="dev", seed=1, max_examples=3, properties="continuation")
    assert "SystemExit(0) raised by the cache's code" in str(error.value)


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.mark.parametrize("limit", ["0", "-1", "nan"])
def test_the_plugin_refuses_a_time_limit_that_is_not_positive(pytester: pytest.Pytester, limit: str) -> None:
    result = pytester.runpytest("-p", "no:cacheprovider", "--kv-cache=targets.plain_cache:make_cache",
                                f"--kv-time-limit={limit}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--kv-time-limit must be > 0 seconds and finite*got {limit}*"])


def _raise(error: BaseException) -> None:
    raise error


def test_a_keyboard_interrupt_is_the_cache_s_unless_a_sigint_came() -> None:
    from kvverify.checks.watchdog import TargetExit, run_with_time_limit

    with pytest.raises(TargetExit, match="KeyboardInterrupt raised by the cache's code"):
        run_with_time_limit(lambda: _raise(KeyboardInterrupt()), 5, "a call")
    with pytest.raises(TargetExit, match=r"SystemExit\(3\) raised by the cache's code \(a call\)"):
        run_with_time_limit(lambda: sys.exit(3), None, "a call")
    if sys.platform != "win32":
        with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C: still stops the run
            run_with_time_limit(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)), 10, "a call")


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM limits are POSIX")
def test_time_limits_nest_without_extending_the_outer_one() -> None:
    from kvverify.checks.watchdog import ExampleTimeout, run_with_time_limit

    def inner(seconds: float, sleep: float) -> None:
        run_with_time_limit(lambda: time.sleep(sleep), seconds, "the inner call")

    with pytest.raises(ExampleTimeout, match="the outer call"):  # an inner limit never extends the outer one
        run_with_time_limit(lambda: inner(30, 30), 0.3, "the outer call")
    started = time.perf_counter()
    with pytest.raises(ExampleTimeout, match="the outer call"):  # the outer limit holds after an inner one ends
        run_with_time_limit(lambda: (inner(0.1, 0), time.sleep(30)), 0.5, "the outer call")
    assert time.perf_counter() - started < 5
    with pytest.raises(ExampleTimeout, match="the inner call"):
        run_with_time_limit(lambda: inner(0.2, 30), 30, "the outer call")


def test_after_a_death_the_remaining_properties_run_in_a_new_process(tmp_path: Path) -> None:
    report = tmp_path / "kv.xml"
    run = _verify("targets.hostile:os_exit_in_update", *QUICK, "--property", "reset", "--junitxml", str(report))
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert output.count("The process running the cache ended with exit code 0") == 2, output
    assert "reproduce: kvverify verify targets.hostile:os_exit_in_update" in output and "--property reset" in output
    assert 'failures="2"' in report.read_text()
