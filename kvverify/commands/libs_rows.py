"""``verify-libs``' results as plain rows: what one environment writes (``--json``) and the merge reads back.

Libraries pin versions that clash with one another (kvpress wants transformers below 5.3, vLLM's CPU build below
5.20), so each library runs in an environment of its own (``tox -e lib-NAME``) and writes its rows to a JSON file;
``kvverify verify-libs --merge A.json B.json ...`` prints the one table.

The file (``format``: :data:`FORMAT`) holds the run's profile, seed, device and seconds, the Python that ran it,
``rows`` (one per library, cache and property) and ``known`` (each known upstream failure's fixed example, as this
environment ran it: an environment without the library says ``skip``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rich.table import Table

from kvverify.adapters.known_failures import Reproduction
from kvverify.runs import table

FORMAT = "kvverify-verify-libs/1"
UNEXPECTED = frozenset({"FAIL", "ERROR", "XPASS"})


class RowsError(ValueError):
    """A rows file that is missing, not JSON, or not what ``verify-libs --json`` writes."""


@dataclass(frozen=True)
class LibraryRow:
    """One (library, cache, property): the verdict (PASS, FAIL, XFAIL, skip, n/a, ERROR) and what it took."""

    library: str  # the distribution and its installed version, "litgpt 0.5.13"
    cache: str
    check: str  # the property, or "-" for the whole cache
    verdict: str
    examples: str
    seconds: str
    note: str

    @property
    def unexpected(self) -> bool:
        return self.verdict in UNEXPECTED


@dataclass(frozen=True)
class KnownRow:
    """A known upstream failure's fixed example, as one environment ran it."""

    name: str
    library: str
    cache: str
    checks: str
    verdict: str  # XFAIL (still fails, as expected), XPASS (fixed upstream), skip (not checkable here), ERROR
    detail: str
    issue: str

    @classmethod
    def of(cls, r: Reproduction) -> KnownRow:
        e = r.entry
        library = f"{e.library} {r.version}" if r.version else e.library
        return cls(e.name, library, e.cache, ", ".join(e.checks), r.verdict, r.detail, e.reference)

    @property
    def unexpected(self) -> bool:
        return self.verdict in UNEXPECTED


@dataclass(frozen=True)
class LibsRun:
    """One environment's ``verify-libs`` run."""

    profile: str
    seed: int
    device: str
    seconds: float
    rows: tuple[LibraryRow, ...]
    known: tuple[KnownRow, ...]
    python: str = sys.executable

    @property
    def unexpected(self) -> int:
        return int(sum(r.unexpected for r in self.rows) + sum(k.unexpected for k in self.known))

    def write(self, path: str | Path) -> None:
        data = {"format": FORMAT, **asdict(self)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def read_run(path: str | Path) -> LibsRun:
    """A file written by ``verify-libs --json``; :class:`RowsError` naming the file and what is wrong otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise RowsError(f"{path}: cannot read it ({error.strerror}); expected a file written by "
                        f"`kvverify verify-libs --json {path}`") from None
    except json.JSONDecodeError as error:
        raise RowsError(f"{path}: not JSON ({error}); expected a file written by `kvverify verify-libs --json`") \
            from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise RowsError(f"{path}: format {found!r}, expected {FORMAT!r}: rerun `kvverify verify-libs --json` with "
                        f"this kvverify")
    try:
        return LibsRun(profile=str(data["profile"]), seed=int(data["seed"]), device=str(data["device"]),
                       seconds=float(data["seconds"]), python=str(data["python"]),
                       rows=tuple(_record(LibraryRow, r) for r in data["rows"]),
                       known=tuple(_record(KnownRow, k) for k in data["known"]))
    except (KeyError, TypeError, ValueError) as error:
        raise RowsError(f"{path}: not a verify-libs run ({type(error).__name__}: {error}); rerun "
                        f"`kvverify verify-libs --json` with this kvverify") from None


def _record(kind: type[Any], data: Any) -> Any:
    names = [f.name for f in fields(kind)]
    if not isinstance(data, dict) or set(data) != set(names):
        raise ValueError(f"a {kind.__name__} has the fields {names}, got {data!r}")
    return kind(**{name: str(data[name]) for name in names})


def merge_known(runs: Iterable[LibsRun]) -> list[KnownRow]:
    """One row per known failure: the environment that could run its fixed example wins over those that could not
    (``skip``); an unexpected verdict wins over an expected one, so a fix upstream is never hidden."""
    merged: dict[str, KnownRow] = {}
    for run in runs:
        for k in run.known:
            held = merged.get(k.name)
            if held is None or _rank(k) > _rank(held):
                merged[k.name] = k
    return list(merged.values())


def _rank(k: KnownRow) -> int:
    return 2 if k.unexpected else 0 if k.verdict == "skip" else 1


def rows_table(rows: Sequence[LibraryRow]) -> Table:
    result = table("library", "cache", "property", "verdict", "examples", "seconds", "note",
                   right=("examples", "seconds"))
    for r in rows:
        result.add_row(r.library, r.cache, r.check, r.verdict, r.examples, r.seconds, r.note,
                       style="bold red" if r.unexpected else None)
    return result


def known_table(known: Sequence[KnownRow]) -> Table:
    """One row per known failure: library and version, cache, checks, verdict of its fixed example (XFAIL: it
    still fails, as expected; XPASS: it passes, fixed upstream: remove the entry), what happened, the issue."""
    result = table("known upstream failure", "library", "cache", "checks", "fixed example", "what happened", "issue")
    for k in known:
        result.add_row(k.name, k.library, k.cache, k.checks, k.verdict, k.detail, k.issue)
    return result
