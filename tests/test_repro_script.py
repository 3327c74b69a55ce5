"""``kvverify verify --repro-script PATH`` writes a script that reproduces the failure on its own: it fails while
the planted bug is there and passes against a correct cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # repro scripts written and run in fresh processes: 20 s of CPU

ROOT = Path(__file__).parents[1]
TESTS = Path(__file__).parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(TESTS)))}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_script_written_for_a_planted_bug_fails_and_passes_against_a_correct_cache(tmp_path: Path) -> None:
    script = tmp_path / "repro.py"
    verify = _run("-m", "kvverify", "verify", "targets.buggy:stale_value", "--profile", "dev", "--seed", "3",
                  "--property", "cached_equals_uncached", "--repro-script", str(script), cwd=tmp_path)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"repro script: python {script}" in verify.stdout
    text = script.read_text(encoding="utf-8")
    assert "TARGET = 'targets.buggy:stale_value'" in text and "CASE = Case(config=ModelConfig(" in text

    buggy = _run(str(script), cwd=tmp_path)
    assert buggy.returncode == 1, buggy.stdout + buggy.stderr
    assert "FAILED: GenerationMismatch" in buggy.stdout and "logits differ" in buggy.stdout

    correct = tmp_path / "correct.py"
    correct.write_text(text.replace("TARGET = 'targets.buggy:stale_value'", "TARGET = 'contiguous'"),
                       encoding="utf-8")
    fixed = _run(str(correct), cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "passed: the bug is not there" in fixed.stdout


def test_a_stateful_program_is_written_with_its_operations(tmp_path: Path) -> None:
    script = tmp_path / "fork.py"
    verify = _run("-m", "kvverify", "verify", "kvverify.mutants.long:ForkSharesBuffers.from_config", "--profile",
                  "dev", "--seed", "0", "--property", "stateful", "--repro-script", str(script), cwd=tmp_path)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "Operation(kind='fork'" in script.read_text(encoding="utf-8")
    assert _run(str(script), cwd=tmp_path).returncode == 1
