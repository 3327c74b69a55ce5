"""The plugin's device: ``--kv-device`` (else ``KVVERIFY_DEVICE``, else the CPU) reaches the target, its cases
and every cache the properties build; a wrong or missing device, or one the cache does not declare, is a usage
error before any test runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvverify.caches import ContiguousCache
from kvverify.checks import Target
from kvverify.plugin import _TargetSession
from kvverify.runs import summarize

pytest_plugins = ["pytester"]

TARGETS = Path(__file__).parent / "targets"
QUICK = ["-p", "no:cacheprovider", "--kv-profile=dev", "--kv-max-examples=3", "--kv-seed=2"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")

#: A cache that writes down the device of every config it is built for and of every key it is given.
RECORDING = """
    from targets.plain_cache import PlainCache

    SEEN = set()

    class Recording(PlainCache):
        def update(self, k, v, layer_idx, cache_kwargs=None):
            SEEN.add(str(k.device))
            SEEN.add(str(cache_kwargs["cache_position"].device))
            return super().update(k, v, layer_idx, cache_kwargs)

    def make(config):
        SEEN.add("config:" + config.device)
        return Recording()
"""

MINE = """
    import torch
    from hypothesis import given, settings
    import recording

    def test_the_device_reaches_target_cases_and_caches(kv_target, kv_cases, kv_reference_model):
        assert kv_target.device == torch.device("cpu")

        @settings(max_examples=3, deadline=None, database=None)
        @given(case=kv_cases())
        def check(case):
            assert case.config.device == "cpu"
            model = kv_reference_model(case.config, case.seed)
            model.generate(case.tokens(), 2, cache=kv_target.new_cache(case.config),
                           attention_mask=case.attention_mask())
        check()
        assert recording.SEEN == {"config:cpu", "cpu"}, recording.SEEN
"""


@pytest.fixture
def here(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(TARGETS, pytester.path / "targets")
    pytester.makepyfile(recording=RECORDING, test_mine=MINE)
    return pytester


def test_kv_device_reaches_the_target_and_every_cache(here: pytest.Pytester) -> None:
    result = here.runpytest("--kv-cache=recording:make", "--kv-device=cpu", *QUICK, "test_mine.py",
                            "-k", "reaches or cached_equals_uncached")
    result.assert_outcomes(passed=2, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["kvverify: target recording:make, profile dev, seed 2, device cpu, *"])


def test_the_environment_variable_is_read_and_the_option_wins(here: pytest.Pytester,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVVERIFY_DEVICE", "tpu")
    refused = here.runpytest("--kv-cache=recording:make", *QUICK)
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["ERROR: kvverify: KVVERIFY_DEVICE='tpu' is not a device kvverify runs on;*"])
    result = here.runpytest("--kv-cache=recording:make", "--kv-device=cpu", *QUICK, "test_mine.py", "-k", "reaches")
    assert result.ret == pytest.ExitCode.OK


@no_cuda
def test_cuda_without_a_gpu_is_a_usage_error_naming_cuda(here: pytest.Pytester,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    result = here.runpytest("--kv-cache=recording:make", "--kv-device=cuda", *QUICK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: kvverify: --kv-device cuda asks for CUDA, but this machine has none: "
                                 "torch.cuda.is_available() is False*"])
    monkeypatch.setenv("KVVERIFY_DEVICE", "cuda:1")
    from_env = here.runpytest("--kv-cache=recording:make", *QUICK)
    assert from_env.ret == pytest.ExitCode.USAGE_ERROR
    from_env.stderr.fnmatch_lines(["ERROR: kvverify: KVVERIFY_DEVICE='cuda:1' asks for CUDA*"])


def test_a_device_the_cache_does_not_declare_is_a_usage_error(here: pytest.Pytester) -> None:
    here.makepyfile(gpu_cache="""
        from kvverify import CacheDeclaration
        from targets.plain_cache import PlainCache

        def make(config):
            return PlainCache()

        make.kvverify_declaration = CacheDeclaration(devices=("cuda",))
    """)
    result = here.runpytest("--kv-cache=gpu_cache:make", *QUICK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: kvverify: target 'gpu_cache:make': the cache declares it runs on cuda *"
                                 "but the suite was asked to run on cpu*"])


def test_the_reproduce_command_keeps_a_device_other_than_the_cpu() -> None:
    def session(device: str, option: str | None) -> _TargetSession:
        target = Target("m:f", ContiguousCache.from_config, device=torch.device(device))
        return _TargetSession("m:f", target, summarize(target), "dev", 2, None, 60.0, option)

    assert session("cuda:1", "cuda:1").reproduce("reset").endswith("--kv-seed=2 --kv-device=cuda:1 -k reset")
    assert "--kv-device" not in session("cpu", "cpu").reproduce("reset")
