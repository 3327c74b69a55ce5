"""The known upstream failures' table: each entry's fixed example, rerun, and what it did here."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from kvverify.adapters.known_failures import Reproduction
from kvverify.runs import table


def known_failures_table(reproductions: Sequence[Reproduction]) -> Table:
    """One row per known failure: library and version, cache, checks, verdict of its fixed example (XFAIL: it
    still fails, as expected; XPASS: it passes, fixed upstream: remove the entry), what happened, the issue."""
    rows = table("known upstream failure", "library", "cache", "checks", "fixed example", "what happened", "issue")
    for r in reproductions:
        e = r.entry
        library = f"{e.library} {r.version}" if r.version else e.library
        rows.add_row(e.name, library, e.cache, ", ".join(e.checks), r.verdict, r.detail, e.reference)
    return rows
