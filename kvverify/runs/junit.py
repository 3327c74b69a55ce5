"""JUnit XML for CI systems, written with junitparser: one testsuite per target, one testcase per property."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

from kvverify.runs.runner import PropertyResult, SuiteResult


def write_junit(results: Sequence[SuiteResult], path: str | Path, *, shard: str | None = None) -> None:
    """Write one ``<testsuite>`` per run (its seed as a property, and the shard, ``I/N``, when the run is one)
    into ``path``; a failed property carries its report and the command that reproduces it, a skipped one the
    reason. The files of N shards merge into one (``junitparser merge``): their suites stay apart."""
    root = JUnitXml(name="kvverify" if shard is None else f"kvverify shard {shard}")
    for suite in results:
        element = TestSuite(suite.target)
        element.add_property("hypothesis_seed", str(suite.seed))
        element.add_property("device", suite.device)
        if shard is not None:
            element.add_property("shard", shard)
        element.add_testcases([_testcase(suite.target, result) for result in suite.results])
        # append, not add_testsuite, which merges suites with the same name and properties; junitparser leaves
        # these two methods unannotated
        root.append(element)  # type: ignore[no-untyped-call]
    root.update_statistics()  # type: ignore[no-untyped-call]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    root.write(str(path))


def _testcase(target: str, result: PropertyResult) -> TestCase:
    case = TestCase(result.name, classname=f"kvverify.{target}", time=round(result.seconds, 3))
    if result.verdict in ("failed", "error"):
        kind, tag = (Failure, "failure") if result.verdict == "failed" else (Error, "error")
        outcome = kind(result.detail.splitlines()[0] if result.detail else tag)
        outcome.text = result.detail + (f"\n\nreproduce: {result.reproduce}" if result.reproduce else "")
        case.result = [outcome]
    elif result.verdict == "skipped":
        case.result = [Skipped(result.detail)]
    case.system_out = f"examples: {result.examples}" + (
        f"\nexamples the cache refused as Unsupported: {result.unsupported}" if result.unsupported else "")
    return case
