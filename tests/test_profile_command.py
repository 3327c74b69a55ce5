"""``kvverify profile``: argument errors, target loading, and the report from a small plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvverify.checks.loading import TargetError, load_factory
from kvverify.cli import main
from kvverify.profiling.plan import CacheSpec, Plan, builtin_specs
from kvverify.profiling.report import write_report
from kvverify.profiling.runner import run_profile

TINY = Plan(presets={"tiny": (8, 24)}, steps=1, repeats=1, ratio_rounds=1, ratio_tokens=2, prompt=4)


def test_bad_target_exits_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile", "--quick", "--out", str(tmp_path), "--target", "no_such_module_xyz:make"])
    assert code == 2
    assert "module 'no_such_module_xyz' could not be imported" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("justamodule", "MODULE:FACTORY"),
        ("kvverify.caches:nothing_here", "not defined in 'kvverify.caches'"),
        ("kvverify.caches:__doc__", "not callable"),
    ],
)
def test_load_target_errors(spec: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        load_factory(spec)


def test_load_target_resolves_dotted_factories() -> None:
    from kvverify.caches import ContiguousCache

    assert load_factory("kvverify.caches:ContiguousCache.from_config") == ContiguousCache.from_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_small_plan_writes_the_three_files_with_plots(tmp_path: Path) -> None:
    target = CacheSpec(
        "kvverify.caches:ContiguousCache.from_config",
        load_factory("kvverify.caches:ContiguousCache.from_config"),
        layout=None,
    )
    calls: list[tuple[int, int]] = []
    profile = run_profile(
        TINY, [*builtin_specs(), target], lambda done, total, _: calls.append((done, total)), tmp_path
    )
    write_report(profile, tmp_path)
    for name in ("report.html", "report.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, f"{name} is missing or empty"
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 3, "report.html must embed at least three plots"
    assert "threads" in page and torch.__version__ in page
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    rows = {(row["cache"], row["length"]): row for row in results["rows"]}
    assert rows[("contiguous", 24)]["held_over_formula"] == pytest.approx(1.0, abs=0.02)
    assert rows[("kvverify.caches:ContiguousCache.from_config", 24)]["predicted_bytes"] is None
    assert all(row["speedup"] is not None and row["speedup"] > 0 for row in results["rows"])
    assert calls[-1][0] == calls[-1][1], "the progress bar must reach its total"
    assert (
        results["tracemalloc_vs_memray"]["memray_bytes"] > 100 * results["tracemalloc_vs_memray"]["tracemalloc_bytes"]
    )


def test_ratios_time_both_loops_against_transformers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kvverify.profiling.plan import transformers_specs

    plan = Plan(presets={"tiny": (8,)}, steps=1, repeats=1, ratio_rounds=1, ratio_tokens=3, prompt=4)
    profile = run_profile(plan, [*builtin_specs(), *transformers_specs()], lambda *_: None, tmp_path)
    rows = {(r.loop, r.reference_cache, r.transformers_cache): r for r in profile.ratios}
    assert set(rows) == {
        ("forward", "contiguous", "hf-dynamic"),
        ("forward", "static", "hf-static"),
        ("generate", "contiguous", "hf-dynamic"),
    }, f"expected both loops timed; got {sorted(rows)} (skipped: {profile.skipped})"
    for row in rows.values():
        expected = row.reference_s_per_token / row.transformers_s_per_token  # one round: the ratio of the medians
        assert row.ratio == pytest.approx(expected), f"{row}: the ratio must be reference / transformers"
    write_report(profile, tmp_path)
    assert "each library's generate()" in (tmp_path / "report.md").read_text(encoding="utf-8")
