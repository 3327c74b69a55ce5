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
    from kvverify.runs import PropertyResult, SuiteResult

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


def print_results(result: SuiteResult, *, shard: str | None = None) -> None:
    """The target's declaration and shapes (and the shard, ``I/N``, when the run is one), then one row per
    property (target, property, examples, verdict, seconds, and a note: why it was skipped, examples the cache
    declined as Unsupported, a lossy cache's largest difference), then each failure's report and the command
    that reproduces it."""
    print(f"{result.target}: {result.declaration}, shapes {result.shapes}" + (f", shard {shard}" if shard else ""))
    from kvverify.runs.settings import PROFILE_OPT_IN

    opted = [r.name for r in result.results if r.name in PROFILE_OPT_IN.get(result.profile, ())]
    if opted:
        print(f"profile {result.profile} runs the opt-in {', '.join(opted)} too (one strict generation past 2048 "
              "tokens)")
    notes = [_note(r) for r in result.results]
    rows = table("target", "property", "examples", "verdict", "seconds", *(["note"] if any(notes) else []),
                 right=("examples", "seconds"))
    for r, note in zip(result.results, notes, strict=True):
        rows.add_row(result.target, r.name, str(r.examples), Text(*_MARK[r.verdict]), f"{r.seconds:.1f}",
                     *([note] if any(notes) else []))
    print_table(rows)
    print()
    for r in result.failures:
        print(f"--- {result.target} · {r.name} ---")
        print(r.detail)
        if r.reproduce:
            print(f"reproduce: {r.reproduce}")
        print(flush=True)


def _note(r: PropertyResult) -> str:
    """Why a property was skipped; else how many examples the cache declined and a lossy cache's largest
    logit difference (empty when there is nothing to say)."""
    if r.verdict == "skipped":
        return r.detail
    parts = []
    if r.unsupported:
        parts.append(f"{r.unsupported} example(s) Unsupported, skipped: {r.unsupported_why}")
    if r.largest_difference is not None:
        parts.append(f"largest logit difference {r.largest_difference:.3g}")
    return "; ".join(parts)
