"""Known upstream failures: matched only when their fixed example reproduces, and reported XPASS once fixed."""

from __future__ import annotations

import pytest

from kvverify.adapters.known_failures import KnownFailure, KnownFailures, in_range, release, reproduce


def _entry(outcome: str | None, versions: tuple[str, str | None] = ("0", None)) -> KnownFailure:
    return KnownFailure(name="demo", library="torch", versions=versions, cache="demo-cache", checks=("crop",),
                        pattern=r"get_seq_length\(\) is -1", summary="demo", reproduce=lambda: outcome)


def test_versions() -> None:
    assert release("5.24.0") == (5, 24, 0) and release("0.6.1+cpu") == (0, 6, 1) and release("5.0.0rc1") == (5, 0, 0)
    assert in_range("5.24.0", ("5.0", None)) and not in_range("4.9", ("5.0", None))
    assert not in_range("5.3", ("5.0", "5.3"))


def test_a_reproduced_failure_is_expected_only_with_its_pattern() -> None:
    known = KnownFailures([_entry("still broken")])
    assert known.match("demo-cache", "crop", "after crop(-9): get_seq_length() is -1") is not None
    assert known.match("demo-cache", "crop", "logits differ") is None  # another failure of the same cache
    assert known.match("demo-cache", "reorder", "get_seq_length() is -1") is None
    assert known.match("other", "crop", "get_seq_length() is -1") is None
    [r] = known.reproductions()
    assert r.verdict == "XFAIL" and not r.unexpected


def test_a_fixed_failure_is_an_unexpected_pass_and_explains_nothing() -> None:
    known = KnownFailures([_entry(None)])
    assert known.match("demo-cache", "crop", "get_seq_length() is -1") is None
    [r] = known.reproductions()
    assert r.verdict == "XPASS" and r.unexpected and "remove" in r.detail


def test_outside_its_versions_or_not_installed_it_is_skipped() -> None:
    assert reproduce(_entry("broken", versions=("999.0", None))).status == "other version"
    missing = KnownFailure(name="x", library="no-such-distribution-kv", versions=("0", None), cache="c",
                           checks=("crop",), pattern=".", summary="", reproduce=lambda: "broken")
    assert reproduce(missing).verdict == "skip"


def test_transformers_entries_reproduce_here() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")
    from kvverify.adapters.known import registry

    reproductions = {r.entry.name: r for r in registry().reproductions()}
    static = reproductions["transformers-static-overcrop"]
    assert static.verdict == "XFAIL", static.detail
    assert "get_seq_length() is -1" in static.detail
    assert reproductions["transformers-offloaded-all-sliding"].verdict == "XFAIL"
    assert registry().match("transformers-static", "crop",
                            "after crop(-9): get_seq_length(0) returned tensor(-1); expected 0") is not None


def test_the_sliding_and_quantized_crop_entries_reproduce_and_match_the_suites_reports() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")
    from kvverify.adapters.known import registry

    known = registry()
    reproductions = {r.entry.name: r for r in known.reproductions()}
    for name in ("transformers-static-sliding-overcrop", "transformers-quantized-crop-fp8",
                 "transformers-quantized-crop-quanto", "transformers-quantized-crop-hqq"):
        assert reproductions[name].verdict == "XFAIL", (name, reproductions[name].detail)
    sliding = ("step 2, layer 0 (a 1-token update): update() raised IndexError: index_copy_(): index -2 is out of "
               "bounds for dimension 2 with size 6")
    assert known.match("transformers-hybrid", "crop", sliding) is not None
    assert known.match("transformers-fp8", "stateful", "IndexError: too many indices for tensor of dimension 1")
    assert known.match("transformers-quanto", "crop", "after crop(-2): get_seq_length(0) returned 2; expected 0")
    assert known.match("transformers-hqq", "reorder", "IndexError: too many indices for tensor of dimension 1") is None
