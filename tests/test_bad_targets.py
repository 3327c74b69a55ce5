"""Targets that break the contract while running fail their property (exit 1) with a paragraph naming the
rule, never a bare traceback and never a hung suite. Every rule is tested directly in test_contract.py;
these run a few through the command."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from kvverify.cli import main

TESTS = Path(__file__).parent
QUICK = ["--profile", "dev", "--max-examples", "5", "--property", "cached_equals_uncached", "--seed", "2"]


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("float16", "update() returned keys of dtype torch.float16; expected the model's"),
        ("raises_midway", "update() raised IndexError: block table full"),
    ],
)
def test_contract_failures_exit_1_with_the_rule(factory: str, expected: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", f"targets.buggy:{factory}", *QUICK]) == 1
    out = capsys.readouterr().out
    assert expected in out
    assert "Traceback" not in out


def test_a_cache_that_hangs_meets_the_time_limit(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    assert main(["verify", "targets.buggy:hangs", *QUICK, "--time-limit", "0.5"]) == 1
    assert time.perf_counter() - started < 20
    out = capsys.readouterr().out
    assert "did not finish within the time limit of 0.5 s" in out
    assert "case (not shrunk):" in out
    assert "--time-limit 0.5 --property cached_equals_uncached" in out


def test_production_shapes_give_an_example_longer_before_it_counts_as_a_hang() -> None:
    """Padded batches of thousands of tokens pass 60 s on a loaded machine: a hang reported where there was none."""
    from kvverify.commands.verify import _time_limit

    assert _time_limit(argparse.Namespace(time_limit=None, shapes="production")) == 300
    assert _time_limit(argparse.Namespace(time_limit=None, shapes="default")) == 60
    assert _time_limit(argparse.Namespace(time_limit="5", shapes="production")) == 5
    assert _time_limit(argparse.Namespace(time_limit="none", shapes="production")) is None
