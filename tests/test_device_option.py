"""``--device`` on the command line: ``verify``, ``mutants`` and ``profile`` refuse a wrong name or CUDA this
machine lacks with exit 2 and one paragraph, refuse a device the cache does not declare naming both, and name
the device they ran on in the header, the summary and the JUnit report."""

from __future__ import annotations

import argparse
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from kvverify.cli import main
from kvverify.commands.verify import _reproduce_command
from kvverify.runs import PropertyResult, SuiteResult
from kvverify.runs.junit import write_junit

QUICK = ["--profile", "dev", "--max-examples", "3", "--property", "cached_equals_uncached", "--seed", "5"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture
def cuda_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A target whose factory declares it runs on CUDA only."""
    (tmp_path / "gpu_cache.py").write_text(textwrap.dedent("""
        from kvverify import CacheDeclaration, ContiguousCache

        def make(config):
            return ContiguousCache.from_config(config)

        make.kvverify_declaration = CacheDeclaration(devices=("cuda",))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gpu_cache:make"


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_verify_on_cuda_without_a_gpu_exits_2_with_one_paragraph(device: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "contiguous", "--device", device, *QUICK]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before anything runs
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"kvverify verify: --device {device} asks for CUDA, but this machine has none")
    assert "torch.cuda.is_available() is False" in lines[0] and "--device cpu" in lines[0]


def test_verify_refuses_a_device_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "contiguous", "--device", "tpu", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "kvverify verify: --device tpu is not a device kvverify runs on; expected cpu, cuda or cuda:N" in err


def test_verify_refuses_a_device_the_cache_does_not_declare(cuda_only: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", cuda_only, "--device", "cpu", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "the cache declares it runs on cuda" in err and "asked to run on cpu" in err


def test_verify_names_the_device_in_its_header_summary_and_junit(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "kv.xml"
    assert main(["verify", "contiguous", "--device", "cpu", *QUICK, "--junitxml", str(report)]) == 0
    out = capsys.readouterr().out
    assert "kvverify verify: profile dev, seed 5, device cpu" in out
    assert "1 checks in" in out and " s on cpu" in out
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert suite.find("properties/property[@name='device']").get("value") == "cpu"  # type: ignore[union-attr]


def test_the_reproduce_command_keeps_a_device_other_than_the_cpu() -> None:
    args = argparse.Namespace(target="mine:make", profile="dev", max_examples=None, time_limit=None,
                              device="cuda:1")
    assert _reproduce_command(args, "mine:make", 5).endswith("--seed 5 --device cuda:1")
    assert "--device" not in _reproduce_command(argparse.Namespace(**{**vars(args), "device": "cpu"}), "x", 5)


def test_junit_names_the_device_of_each_suite(tmp_path: Path) -> None:
    result = SuiteResult("mine:make", 7, "dev", [PropertyResult("reset", "passed", 3, 0.1)], device="cuda:0")
    write_junit([result], tmp_path / "kv.xml")
    found = ET.parse(tmp_path / "kv.xml").getroot().find("testsuite/properties/property[@name='device']")
    assert found is not None and found.get("value") == "cuda:0"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_on_cuda_passes_the_builtin_caches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--device", "cuda", "--profile", "dev", "--max-examples", "5", "--seed", "1"]) == 0
    assert "on cuda" in capsys.readouterr().out


def test_mutants_refuse_a_wrong_or_missing_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mutants", "--device", "tpu", "--only", "keys_as_values"]) == 2
    assert "kvverify mutants: --device tpu is not a device kvverify runs on" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["mutants", "--device", "cuda", "--only", "keys_as_values"]) == 2
        assert "kvverify mutants: --device cuda asks for CUDA" in capsys.readouterr().err


def test_mutants_run_the_suite_the_controls_and_the_baseline_on_the_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvverify.mutants.baseline
    import kvverify.runs

    devices: list[object] = []

    def run_suite(factory: object, *, target: str, **options: object) -> SuiteResult:
        devices.append(options.get("device"))
        verdict = "failed" if target.startswith("mutant:") else "passed"
        return SuiteResult(target, 0, "dev", [PropertyResult("reset", verdict, 1, 0.0, "boom")])

    def run_baseline(factory: object, **options: object) -> kvverify.mutants.baseline.BaselineResult:
        devices.append(options.get("device"))
        return kvverify.mutants.baseline.BaselineResult(True, "x", 0.0, 1)

    monkeypatch.setattr(kvverify.runs, "run_suite", run_suite)
    monkeypatch.setattr(kvverify.mutants.baseline, "run_baseline", run_baseline)
    assert main(["mutants", "--device", "cpu", "--only", "keys_as_values", "--profile", "dev"]) == 0
    assert "kvverify mutants: profile dev, seed 0, device cpu" in capsys.readouterr().out
    assert len(devices) >= 3 and set(devices) == {torch.device("cpu")}  # mutant, baseline, controls


def test_the_baseline_grid_runs_on_the_device_it_is_given() -> None:
    from kvverify.caches import ContiguousCache
    from kvverify.mutants import MUTANTS
    from kvverify.mutants.baseline import run_baseline

    assert not run_baseline(ContiguousCache.from_config, device="cpu").killed
    assert run_baseline(MUTANTS["keys_as_values"].factory, device=torch.device("cpu")).killed


@pytest.mark.parametrize("device", ["tpu", "cuda:1"])
def test_profile_refuses_a_wrong_or_missing_device(device: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    assert main(["profile", "--quick", "--device", device, "--out", str(tmp_path)]) == 2
    assert f"kvverify profile: --device {device} " in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
