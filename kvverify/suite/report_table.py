"""Plain-text result tables for the terminal."""

from __future__ import annotations

from kvverify.suite import SuiteResult

_MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "skip", "error": "ERROR"}


def print_results(result: SuiteResult) -> None:
    """One line per property (target, property, examples, verdict, seconds), then each failure's report and
    the command that reproduces it."""
    width = max((len(r.name) for r in result.results), default=8)
    for r in result.results:
        extra = f"  ({r.detail})" if r.verdict == "skipped" else ""
        print(f"{result.target:<24} {r.name:<{width}} {r.examples:>6} examples  {_MARK[r.verdict]:<5} "
              f"{r.seconds:7.1f} s{extra}", flush=True)
    for r in result.failures:
        print(f"\n--- {result.target} · {r.name} ---")
        print(r.detail)
        if r.reproduce:
            print(f"reproduce: {r.reproduce}")
        print(flush=True)
