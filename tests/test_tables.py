"""The commands' tables: plain text in a log, one line per row however wide, cells never read as markup."""

from __future__ import annotations

import contextlib
import io

from kvverify.commands.tables import print_results
from kvverify.runs import PropertyResult, SuiteResult, print_table, table


def test_a_wide_row_stays_one_line_without_colour_codes() -> None:
    rows = table("mutant", "shrunk example")
    cell = "prompt: [b]left padding[/b] per row [0, 1]; " + "x" * 300  # rich markup must print as it is
    rows.add_row("crop_zero_noop", cell)
    out = io.StringIO()
    print_table(rows, file=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, f"expected a header, a rule and one row; got:\n{out.getvalue()}"
    assert lines[2].startswith("crop_zero_noop") and cell in lines[2], lines[2]
    assert "\x1b[" not in out.getvalue(), "a log must carry no terminal escape codes"


def test_suite_results_name_each_verdict_and_the_skip_reason() -> None:
    result = SuiteResult("mine:make", 7, "dev", [
        PropertyResult("cached_equals_uncached", "passed", 10, 0.5),
        PropertyResult("reorder", "skipped", 0, 0.0, "the cache has no reorder_cache()"),
    ])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_results(result)
    rows = {line.split()[1]: line.split() for line in out.getvalue().splitlines() if line.startswith("mine:make")}
    assert rows["cached_equals_uncached"][2:5] == ["10", "PASS", "0.5"], out.getvalue()
    assert rows["reorder"][3] == "skip" and "the cache has no reorder_cache()" in " ".join(rows["reorder"])


def test_the_thorough_profile_runs_long_context_and_says_so() -> None:
    from kvverify.checks.properties import PROPERTIES
    from kvverify.runs.options import check_options

    assert check_options(profile="thorough", properties=None, time_limit=None, max_examples=None) == [
        *PROPERTIES, "long_context"]
    for profile in ("dev", "ci"):
        assert "long_context" not in check_options(profile=profile, properties=None, time_limit=None,
                                                   max_examples=None)
    result = SuiteResult("t", 0, "thorough", [PropertyResult("long_context", "passed", 1, 70.0)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_results(result)
    assert "profile thorough runs the opt-in long_context too" in out.getvalue(), out.getvalue()
