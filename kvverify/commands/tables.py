"""The suite's per-property table, drawn with :mod:`kvverify.runs.tables`' writer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from kvverify.runs import print_table, table

if TYPE_CHECKING:
    from kvverify.runs import PropertyResult, SuiteResult

#: The word for each verdict in the suite's table, and its colour on a terminal.
_MARK = {"passed": ("PASS", "green"), "failed": ("FAIL", "bold red"), "skipped": ("skip", "yellow"),
         "error": ("ERROR", "bold red")}

def print_results(result: SuiteResult, *, shard: str | None = None) -> None:
    """The target's declaration and shapes (and the shard, ``I/N``, when the run is one), then one row per
    property (target, property, examples, verdict, seconds, and a note: why it was skipped, examples the cache
    declined as Unsupported, a lossy cache's largest difference), then each failure's report and the command
    that reproduces it."""
    print(f"{result.target}: {result.declaration}, shapes {result.shapes}" + (f", shard {shard}" if shard else ""))
    from kvverify.runs import PROFILE_OPT_IN

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
