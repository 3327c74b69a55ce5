"""``kvverify verify-libs``: its rows as JSON (one file per environment) and ``--merge``'s one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvverify.adapters.known_failures import KnownFailure, KnownFailures
from kvverify.adapters.libraries import LibraryCache
from kvverify.cli import main
from kvverify.commands import verify_libs
from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.commands.libs_rows import FORMAT, KnownRow, LibraryRow, LibsRun, merge_known, read_run


def _known(name: str, outcome: str | None) -> KnownFailure:
    return KnownFailure(name=name, library="pytest", versions=("0", None), cache="some-cache", checks=("crop",),
                        pattern="x", summary="s", reproduce=lambda: outcome, issue="https://example.org/1")


@pytest.fixture
def one_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """verify-libs over one pair only: kvverify's own contiguous cache, and a known failure that reproduces."""
    monkeypatch.setattr(verify_libs, "LIBRARY_CACHES", (
        LibraryCache("pytest", "contiguous", "contiguous", "some-cache"),
        LibraryCache("pytest", "absent", "contiguous", "other", needs=("no_such_module_here",)),
    ))
    monkeypatch.setattr(verify_libs, "registry", lambda: KnownFailures([_known("still-broken", "it broke")]))


@pytest.mark.usefixtures("one_library")
def test_json_holds_the_rows_the_table_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "envs" / "pytest.json"
    code = main(["verify-libs", "--profile", "ci", "--max-examples", "1", "--json", str(out)])
    assert code == EXIT_OK, capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == FORMAT and data["profile"] == "ci" and data["seed"] == 0
    run = read_run(out)
    verdicts = {(r.cache, r.check): r.verdict for r in run.rows}
    assert verdicts[("absent", "-")] == "n/a"
    assert verdicts[("contiguous", "crop")] == "PASS"
    assert [(k.name, k.verdict) for k in run.known] == [("still-broken", "XFAIL")]
    assert run.unexpected == 0


def _run(rows: tuple[LibraryRow, ...] = (), known: tuple[KnownRow, ...] = ()) -> LibsRun:
    return LibsRun("dev", 0, "cpu", 1.0, rows, known)


def _row(verdict: str, library: str = "litgpt 0.5.13") -> LibraryRow:
    return LibraryRow(library, "KVCache", "chunked_prefill", verdict, "3", "0.5", "")


def _known_row(verdict: str) -> KnownRow:
    return KnownRow("litgpt-chunked", "litgpt", "litgpt-sliding", "chunked_prefill", verdict, "", "")


def test_merge_prints_every_environment_and_fails_on_anything_unexpected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _run((_row("PASS"), _row("XFAIL"))).write(a)
    _run((_row("PASS", library="kvpress 0.5.5"),)).write(b)
    assert main(["verify-libs", "--merge", str(a), str(b)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "litgpt 0.5.13" in out and "kvpress 0.5.5" in out and "0 unexpected in 2 environments" in out
    _run((_row("FAIL", library="kvpress 0.5.5"),)).write(b)
    assert main(["verify-libs", "--merge", str(a), str(b)]) == EXIT_FAILED


def test_a_known_failure_is_judged_where_its_library_is_installed() -> None:
    here, elsewhere = _run(known=(_known_row("XFAIL"),)), _run(known=(_known_row("skip"),))
    assert [k.verdict for k in merge_known([elsewhere, here])] == ["XFAIL"]
    assert [k.verdict for k in merge_known([here, elsewhere])] == ["XFAIL"]
    fixed = _run(known=(_known_row("XPASS"),))  # fixed upstream: never hidden by an environment that still fails
    assert [k.verdict for k in merge_known([fixed, here])] == ["XPASS"]


@pytest.mark.parametrize(("content", "says"), [
    (None, "cannot read it"),
    ("{not json", "not JSON"),
    ('{"format": "something-else"}', "format 'something-else'"),
    (json.dumps({"format": FORMAT, "profile": "dev"}), "not a verify-libs run"),
])
def test_merge_names_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                                says: str) -> None:
    path = tmp_path / "rows.json"
    if content is not None:
        path.write_text(content)
    assert main(["verify-libs", "--merge", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(path) in err and says in err and "verify-libs --json" in err


def test_an_unknown_library_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-libs", "--libraries", "no-such-lib"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no-such-lib" in err and "transformers" in err
