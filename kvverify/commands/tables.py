"""The commands' tables, drawn with rich: the helpers every table uses, and the suite's per-property table.

On a terminal a table fits the window and marks verdicts in colour; in a log (CI, a pipe, a file) it is plain
text without colour codes, as wide as its widest row and never wrapped, so each row stays one greppable line.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kvverify.suite import SuiteResult

#: The word for each verdict in the suite's table, and its colour on a terminal.
_MARK = {"passed": ("PASS", "green"), "failed": ("FAIL", "bold red"), "skipped": ("skip", "yellow"),
         "error": ("ERROR", "bold red")}

_UNBOUNDED = 1_000_000  # columns: a width no table reaches, to measure a table's natural width


def table(*headers: str, right: tuple[str, ...] = ()) -> Table:
    """An empty table with these column headers (those in ``right`` right-aligned): a rule under the header,
    no borders, the first column at the line's start."""
    result = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        result.add_column(header, justify="right" if header in right else "left")
    return result


def print_table(rows: Table, *, file: IO[str] | None = None) -> None:
    """Print a table on ``file`` (default: stdout). Cells are plain text: no markup, emoji or highlighting."""
    console = _console(file)
    if not console.is_terminal:  # a log: as wide as the table, so no row wraps
        natural = console.measure(rows, options=console.options.update_width(_UNBOUNDED)).maximum
        console = _console(file, width=max(natural, 1))
    console.print(rows)


def _console(file: IO[str] | None, width: int | None = None) -> Console:
    return Console(file=file, width=width, markup=False, emoji=False, highlight=False)


def print_results(result: SuiteResult) -> None:
    """One row per property (target, property, examples, verdict, seconds, and why a property was skipped),
    then each failure's report and the command that reproduces it."""
    notes = any(r.verdict == "skipped" for r in result.results)
    rows = table("target", "property", "examples", "verdict", "seconds", *(["note"] if notes else []),
                 right=("examples", "seconds"))
    for r in result.results:
        note = [r.detail if r.verdict == "skipped" else ""] if notes else []
        rows.add_row(result.target, r.name, str(r.examples), Text(*_MARK[r.verdict]), f"{r.seconds:.1f}", *note)
    print_table(rows)
    print()
    for r in result.failures:
        print(f"--- {result.target} · {r.name} ---")
        print(r.detail)
        if r.reproduce:
            print(f"reproduce: {r.reproduce}")
        print(flush=True)
