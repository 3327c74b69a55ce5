"""``verify-libs`` with a library that brings its own checks (``LibraryCache.checks``: a cache in C++ that kvverify
cannot hold, such as llama.cpp's): their results are tabled, and matched against known failures, like the suite's."""

from __future__ import annotations

import pytest

from kvverify.adapters.known_failures import KnownFailure, KnownFailures
from kvverify.adapters.libraries import LibraryCache
from kvverify.cli import main
from kvverify.commands import verify_libs
from kvverify.commands.exits import EXIT_FAILED, EXIT_OK


def _use(monkeypatch: pytest.MonkeyPatch, checks: str, known: list[KnownFailure]) -> None:
    monkeypatch.setattr(verify_libs, "LIBRARY_CACHES", (LibraryCache("pytest", "in C++", "", "own", checks=checks),))
    monkeypatch.setattr(verify_libs, "registry", lambda: KnownFailures(known))


def test_own_checks_are_tabled_and_a_failure_is_unexpected(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _use(monkeypatch, "tests.targets.own_checks:two_checks", [])
    assert main(["verify-libs"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "holds" in out and "PASS" in out and "breaks" in out and "it broke at step 1" in out


def test_a_known_failure_of_own_checks_is_xfail(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    known = KnownFailure(name="pytest-breaks", library="pytest", versions=("0", None), cache="own",
                         checks=("breaks",), pattern="it broke", summary="s", reproduce=lambda: "still broken")
    _use(monkeypatch, "tests.targets.own_checks:two_checks", [known])
    assert main(["verify-libs"]) == EXIT_OK, capsys.readouterr().out
    assert "XFAIL" in capsys.readouterr().out


@pytest.mark.parametrize("checks,says", [("tests.targets.own_checks:absent", "names no function"),
                                         ("tests.targets.own_checks:refuses", "CPU only"),
                                         ("no_such_module_here:f", "No module named")])
def test_checks_that_cannot_run_are_an_error_row(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], checks: str, says: str) -> None:
    _use(monkeypatch, checks, [])
    assert main(["verify-libs"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "ERROR" in out and says in out, out


def test_prepare_runs_once_before_the_checks(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A library's one-time build (quanto compiles its extension on first use) runs before any time limit."""
    from tests.targets import own_checks

    monkeypatch.setattr(own_checks, "CALLS", [])
    monkeypatch.setattr(verify_libs, "LIBRARY_CACHES", (LibraryCache(
        "pytest", "in C++", "", "own", checks="tests.targets.own_checks:checks_after_build",
        prepare="tests.targets.own_checks:build_once"),))
    monkeypatch.setattr(verify_libs, "registry", lambda: KnownFailures([]))
    assert main(["verify-libs"]) == EXIT_OK, capsys.readouterr().out
    assert own_checks.CALLS == ["prepare", "checks"]


@pytest.mark.parametrize("prepare,says", [("tests.targets.own_checks:build_fails", "ninja: build stopped"),
                                          ("tests.targets.own_checks:absent", "names no function")])
def test_a_failed_prepare_is_an_error_row(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          prepare: str, says: str) -> None:
    monkeypatch.setattr(verify_libs, "LIBRARY_CACHES", (LibraryCache(
        "pytest", "in C++", "", "own", checks="tests.targets.own_checks:two_checks", prepare=prepare),))
    monkeypatch.setattr(verify_libs, "registry", lambda: KnownFailures([]))
    assert main(["verify-libs"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "ERROR" in out and says in out and "holds" not in out, out


def test_the_quanto_row_builds_quanto_first() -> None:
    from kvverify.adapters.libraries import LIBRARY_CACHES

    (quanto,) = [e for e in LIBRARY_CACHES if e.cache == "QuantizedCache quanto"]
    assert quanto.prepare == "kvverify.adapters.hf.caches:build_quanto_extension"
