"""The known upstream failures' table: each entry's fixed example, rerun, and what it did here."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from kvverify.adapters.known_failures import Reproduction
from kvverify.commands.libs_rows import KnownRow, known_table


def known_failures_table(reproductions: Sequence[Reproduction]) -> Table:
    """:func:`~kvverify.commands.libs_rows.known_table` of these reproductions."""
    return known_table([KnownRow.of(r) for r in reproductions])
