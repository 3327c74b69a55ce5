"""``kvverify verify MODULE:FACTORY``: correct caches written outside the project pass (exit 0), a cache with one
planted bug fails (exit 1) with a located report and a command that reproduces the same failure, a wrong
command or an unusable target exits 2. ``kvverify.check_cache`` is the same run from Python."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import kvverify
from kvverify.cli import main

TESTS = Path(__file__).parent
QUICK = ["--profile", "dev", "--max-examples", "8", "--property", "cached_equals_uncached", "--seed", "5"]


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def test_a_plain_cache_written_outside_the_project_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "targets.plain_cache:make_cache", *QUICK]) == 0
    assert re.search(r"cached_equals_uncached\s+8\s+PASS", capsys.readouterr().out)


def test_transformers_dynamic_cache_passes() -> None:
    pytest.importorskip("transformers")
    assert main(["verify", "targets.hf_dynamic:make_cache", *QUICK]) == 0


def test_a_planted_bug_fails_with_a_located_report_that_reproduces(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "targets.buggy:stale_value", *QUICK]) == 1
    first = capsys.readouterr().out
    assert "where (first difference): layer 1, head" in first
    assert "@reproduce_failure(" in first
    command = re.search(r"^reproduce: kvverify verify (.*)$", first, re.M)
    assert command is not None, first
    assert "--seed 5" in command.group(1) and "--property cached_equals_uncached" in command.group(1)
    assert main(["verify", *command.group(1).split()]) == 1
    again = capsys.readouterr().out
    report = first[first.index("--- "):]
    assert again[again.index("--- "):].split("\n\n")[:3] == report.split("\n\n")[:3]  # the same minimal case


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["targets.no_such:make"], "could not be imported"),
        (["targets.unusable:returns_none"], "the factory returned None"),
        (["targets.plain_cache:make_cache", "--max-examples", "0"], "--max-examples must be >= 1"),
        (["targets.plain_cache:make_cache", "--property", "nope"], "unknown property 'nope'"),
        (["targets.plain_cache:make_cache", "--time-limit", "-1"], "--time-limit must be > 0"),
    ],
)
def test_an_unusable_target_or_wrong_command_exits_2(argv: list[str], expected: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_junitxml_carries_the_failure(tmp_path: Path) -> None:
    path = tmp_path / "kv.xml"
    assert main(["verify", "targets.buggy:float16", *QUICK, "--junitxml", str(path)]) == 1
    failure = ET.parse(path).getroot().find("testsuite/testcase[@name='cached_equals_uncached']/failure")
    assert failure is not None and "of dtype torch.float16" in (failure.text or "")
    assert "reproduce: kvverify verify targets.buggy:float16" in (failure.text or "")


def test_check_cache_raises_an_informative_error() -> None:
    from targets import buggy

    with pytest.raises(kvverify.CacheCheckFailed) as error:
        kvverify.check_cache(buggy.float16, profile="dev", seed=5, max_examples=8,
                             properties=["cached_equals_uncached"])
    message = str(error.value)
    assert "1 propert(y/ies) failed for make_Float16" in message and "of dtype torch.float16" in message
    assert "reproduce: kvverify.check_cache(make_Float16, profile='dev', seed=5, max_examples=8" in message


def test_check_cache_returns_the_result_when_every_property_holds() -> None:
    from targets.plain_cache import make_cache

    result = kvverify.check_cache(make_cache, profile="dev", seed=1, max_examples=5,
                                  properties=["cached_equals_uncached"])
    assert result.ok and result.results[0].examples == 5
