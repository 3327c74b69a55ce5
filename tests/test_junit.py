"""JUnit XML: parses, one testcase per property, failures and skips carried with their reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kvverify.runs import PropertyResult, SuiteResult
from kvverify.runs.junit import write_junit


def test_the_xml_parses_and_carries_failures(tmp_path: Path) -> None:
    result = SuiteResult("mine:make", 7, "dev", [
        PropertyResult("cached_equals_uncached", "passed", 10, 0.5),
        PropertyResult("crop", "failed", 3, 1.0, "logits differ\n\nwhere: layer 1", reproduce="kvverify verify x"),
        PropertyResult("reorder", "skipped", 0, 0.0, "the cache has no reorder_cache()"),
    ])
    path = tmp_path / "out" / "kv.xml"
    write_junit([result], path)
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    failure = suite.find("testcase[@name='crop']/failure")
    assert failure is not None and failure.get("message") == "logits differ"
    assert "where: layer 1" in (failure.text or "") and "reproduce: kvverify verify x" in (failure.text or "")
    assert suite.find("testcase[@name='reorder']/skipped") is not None


def test_each_run_is_its_own_testsuite_and_errors_are_errors(tmp_path: Path) -> None:
    runs = [SuiteResult("mine:make", 7, "dev", [PropertyResult("crop", "error", 0, 0.1, "InvalidArgument: x")])] * 2
    path = tmp_path / "kv.xml"
    write_junit(runs, path)
    root = ET.parse(path).getroot()
    suites = root.findall("testsuite")
    assert len(suites) == 2, "two runs of one target must stay two testsuites"
    assert all((s.get("tests"), s.get("errors"), s.get("failures")) == ("1", "1", "0") for s in suites)
    error = suites[0].find("testcase[@name='crop']/error")
    assert error is not None and error.get("message") == "InvalidArgument: x"
    seed = root.find("testsuite/properties/property[@name='hypothesis_seed']")
    assert seed is not None and seed.get("value") == "7"
