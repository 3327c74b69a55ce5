"""Tables, the one writer of each kind: rich tables for the terminal and the log, Markdown tables for reports.

On a terminal a rich table fits the window and marks verdicts in colour; in a log (CI, a pipe, a file) it is
plain text without colour codes, as wide as its widest row and never wrapped, so each row stays one greppable
line. A Markdown table is a header, its rule and one line per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table

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


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, one line per row."""
    return [markdown_row(header), "|" + "---|" * len(header), *(markdown_row(row) for row in rows)]
