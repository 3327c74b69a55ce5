"""JUnit XML for CI systems: one testsuite per target, one testcase per property."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from kvverify.suite import SuiteResult


def write_junit(results: Sequence[SuiteResult], path: str | Path) -> None:
    root = ET.Element("testsuites", name="kvverify")
    for suite in results:
        failures = sum(r.verdict == "failed" for r in suite.results)
        errors = sum(r.verdict == "error" for r in suite.results)
        skipped = sum(r.verdict == "skipped" for r in suite.results)
        element = ET.SubElement(
            root,
            "testsuite",
            name=suite.target,
            tests=str(len(suite.results)),
            failures=str(failures),
            errors=str(errors),
            skipped=str(skipped),
            time=f"{sum(r.seconds for r in suite.results):.3f}",
        )
        properties = ET.SubElement(element, "properties")
        ET.SubElement(properties, "property", name="hypothesis_seed", value=str(suite.seed))
        ET.SubElement(properties, "property", name="device", value=suite.device)
        for result in suite.results:
            case = ET.SubElement(
                element,
                "testcase",
                classname=f"kvverify.{suite.target}",
                name=result.name,
                time=f"{result.seconds:.3f}",
            )
            if result.verdict in ("failed", "error"):
                tag = "failure" if result.verdict == "failed" else "error"
                child = ET.SubElement(case, tag, message=result.detail.splitlines()[0] if result.detail else tag)
                child.text = result.detail + (f"\n\nreproduce: {result.reproduce}" if result.reproduce else "")
            elif result.verdict == "skipped":
                ET.SubElement(case, "skipped", message=result.detail)
            ET.SubElement(case, "system-out").text = f"examples: {result.examples}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
