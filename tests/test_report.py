"""report.html from its template: every value escaped, every section present, the figures embedded."""

from __future__ import annotations

from kvverify.profiling.report import html_page
from kvverify.profiling.results import CacheRow, Profile, RatioRow


def _profile(cache: str) -> Profile:
    row = CacheRow(preset="tiny", cache=cache, layout=None, window=None, length=8, prefill_s=1e-3,
                   cached_step_s=2e-3, uncached_step_s=4e-3, held_bytes=1024, formula_bytes=1024,
                   predicted_bytes=None, memray_peak_bytes=-1, churn_bytes=-1, churn_count=0, flops_cached=10,
                   flops_uncached=20, uncached_peak_estimate_bytes=30)
    ratio = RatioRow(preset="tiny", loop="forward", reference_cache="contiguous", transformers_cache="hf-dynamic",
                     prompt=4, new_tokens=3, rounds=1, reference_s_per_token=1e-3, transformers_s_per_token=2e-3,
                     ratio=0.5)
    profile = Profile(environment={"threads": 1}, rows=[row], ratios=[ratio], skipped=["transformers: absent"])
    profile.cuda = {"peak": "1 MiB"}
    return profile


def test_values_are_escaped_and_every_section_is_there() -> None:
    page = html_page(_profile("<script>alert(1)</script>"), [("memory_tiny", "memory & time", b"\x89PNG")])
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'alt="memory &amp; time" src="data:image/png;base64,iVBORw=="' in page
    for heading in ("Every cache at every length", "Without a cache", "CUDA", "Not measured"):
        assert f"<h2>{heading}</h2>" in page, f"report.html lacks the section {heading!r}"
    assert "<td>2.000</td>" in page and "<li>transformers: absent</li>" in page and "<li>threads: 1</li>" in page
