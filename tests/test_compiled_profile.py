"""The profile's engines and presets: --engine compiled in the ratio rows, --preset refused on a CPU, and the
preset sweep run on a tiny model on the CPU (the path a GPU runs at real sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvverify.cli import main
from kvverify.commands.sweep_report import markdown
from kvverify.profiling import engines
from kvverify.profiling.plan import Plan, builtin_specs, transformers_specs
from kvverify.profiling.presets import PRESETS, PresetError, Sweep, preset_config, sweep_for, weight_bytes
from kvverify.profiling.runner import run_profile
from kvverify.profiling.sweep import run_sweep
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

TINY = ModelConfig.preset("tiny", numerics="fast", max_seq_len=64)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_on_the_cpu_is_refused_with_the_reason(name: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--preset", name, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--preset {name}" in err and "needs a GPU" in err and "--quick" in err, err
    assert not (tmp_path / "sweep.json").exists()


def test_preset_shapes_are_the_1b_and_8b_classes() -> None:
    one, eight = preset_config("1b", "cpu"), preset_config("8b", "cpu")
    assert (one.d_model, one.n_layers, one.n_heads, one.n_kv_heads, one.d_ff, one.vocab_size) == (
        2048, 16, 32, 8, 5632, 32000)
    assert (eight.d_model, eight.n_layers, eight.head_dim, eight.d_ff, eight.vocab_size) == (4096, 32, 128, 14336,
                                                                                              128256)
    assert one.dtype == torch.bfloat16 and one.max_seq_len >= 32768
    assert 1.5e9 < weight_bytes(one) < 1.7e9 and 14.5e9 < weight_bytes(eight) < 16.5e9
    with pytest.raises(PresetError, match="expected one of 1b, 8b"):
        preset_config("70b", "cpu")
    with pytest.raises(PresetError, match="needs a GPU"):
        sweep_for("1b", torch.device("cpu"))


def test_the_sweep_runs_on_a_tiny_model() -> None:
    pytest.importorskip("transformers")
    sweep = Sweep("tiny", TINY, contexts=(8, 32), batches=(1, 2), steps=2)
    notes: list[str] = []
    report = run_sweep(sweep, "eager", notes.append)
    assert [(r.batch, r.context) for r in report.decode] == [(1, 8), (1, 32), (2, 8), (2, 32)]
    assert all(r.fits and r.step_s and r.kv_held_bytes == r.kv_formula_bytes for r in report.decode), report.decode
    assert [r.context for r in report.uncached] == [8, 32] and report.quadratic_from > 0
    assert {"reference eager, static cache", "reference compiled, static cache", "transformers dynamic cache",
            "transformers static cache"} == set(report.batch_1)
    assert report.weight_floor_s > 0 and notes
    text = "\n".join(markdown(report))
    assert "weight-read floor" in text and "| 2 | 32 | yes |" in text, text
    json.dumps(report.as_dict())


def test_compiled_ratios_time_the_same_tokens() -> None:
    pytest.importorskip("transformers")
    from kvverify.adapters.hf import CACHES
    from kvverify.adapters.hf.llama import to_llama

    model = ReferenceModel(TINY)
    llama = to_llama(model, attn_implementation="sdpa")
    prompt = torch.randint(0, TINY.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    make = CACHES["dynamic"].target
    assert make is not None
    ratio = engines.generate_ratio(model, llama, lambda: make(TINY), prompt, 6, rounds=1)
    assert ratio is not None and ratio.ratio > 0, "the compiled engine and transformers chose different tokens"
    assert engines.forward_ratio(model, llama, lambda: make(TINY), prompt, 6, rounds=1).ratio > 0


def test_the_profile_records_its_engine(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    plan = Plan(presets={"tiny": (8,)}, steps=1, repeats=1, ratio_rounds=1, ratio_tokens=3, prompt=4, engine="compiled")
    profile = run_profile(plan, builtin_specs() + transformers_specs(), lambda *a: None, tmp_path)
    assert profile.environment["engine"] == "compiled"
    assert profile.ratios and all(r.engine == "compiled" and r.reference_cache == "static" for r in profile.ratios)
    with pytest.raises(ValueError, match="unknown engine"):
        engines.check_engine("jit")


def test_the_sweep_runs_the_compiled_engine() -> None:
    report = run_sweep(Sweep("tiny", TINY, contexts=(8,), batches=(2,), steps=2), "compiled", lambda what: None,
                       transformers=False)
    (row,) = report.decode
    # a figure, not a timing gate (how fast the step is, is the profiles' business, measured side by side)
    assert report.engine == "compiled" and row.fits and row.step_s is not None and row.step_s > 0, row
    # the static cache's buffers, and its lengths counter (int64 per layer) written by the compiled step
    assert row.kv_held_bytes == row.kv_formula_bytes + 8 * TINY.n_layers, row
