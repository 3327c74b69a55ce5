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
