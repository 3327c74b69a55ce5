"""The device option: names parsed and checked in one place (:mod:`kvverify.checks.devices`), CUDA refused with
one paragraph on a machine without it, ``CacheDeclaration(devices=...)`` honoured, and the device passed
through ``check_cache`` to every model, prompt and cache of the run."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import kvverify
from kvverify.caches import ContiguousCache
from kvverify.checks.devices import DeviceError, declares, describe_device, parse_device, resolve_device
from kvverify.checks.loading import TargetError
from kvverify.checks.target import make_target
from kvverify.protocol.cache import CacheDeclaration

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
QUICK: dict[str, Any] = dict(profile="dev", max_examples=4, seed=3, properties=["cached_equals_uncached"])


@pytest.mark.parametrize("text", ["cpu", "CPU", " cpu ", "cpu:0", torch.device("cpu")])
def test_the_cpu_resolves_under_any_spelling(text: str | torch.device) -> None:
    assert resolve_device(text) == torch.device("cpu")


def test_no_device_means_the_cpu() -> None:
    assert resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3", "CUDA:1"])
def test_cuda_names_parse_without_a_gpu(text: str) -> None:
    assert parse_device(text) == torch.device(text.lower())


@pytest.mark.parametrize(("text", "said"), [
    ("tpu", "--device tpu is not a device kvverify runs on"),
    ("", "--device '' is not a device"),
    ("cuda:-1", "--device cuda:-1 is not a device"),
    ("gpu", "--device gpu is not a device"),
    ("mps", "--device mps names the mps backend"),
    ("meta", "--device meta names the meta backend"),
])
def test_other_names_are_refused_with_what_is_accepted(text: str, said: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(text)
    assert said in str(caught.value)
    assert "expected cpu, cuda or cuda:N" in str(caught.value) or "runs on cpu, cuda or cuda:N" in str(caught.value)
    assert "Use --device cpu" in str(caught.value)


def test_the_message_spells_the_option_it_came_from() -> None:
    with pytest.raises(DeviceError, match=r"device='tpu' is not a device .* Use device='cpu'"):
        resolve_device("tpu", option="device=")


@no_cuda
@pytest.mark.parametrize("text", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_paragraph_naming_cuda(text: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(text)
    message = str(caught.value)
    assert "\n" not in message
    assert f"--device {text} asks for CUDA" in message  # what was asked
    assert "torch.cuda.is_available() is False" in message and torch.__version__ in message  # what there is
    assert "--device cpu" in message  # what to do


def test_a_cuda_build_that_sees_no_gpu_says_where_to_look(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError, match=r"built for CUDA 12.8 but sees no GPU.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_names_the_ones_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"--device cuda:2 asks for CUDA on GPU 2, but this machine has 2 CUDA "
                                          r"device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_describe_names_the_cpu_plainly() -> None:
    assert describe_device(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize(("declared", "device", "runs"), [
    (("cuda",), "cuda:1", True),
    (("cuda",), "cuda", True),
    (("cuda:1",), "cuda:1", True),
    (("cuda:1",), "cuda:0", False),
    (("cuda:0",), "cuda", True),
    (("cuda",), "cpu", False),
    (("cpu", "cuda"), "cpu", True),
])
def test_declared_devices_cover_what_they_name(declared: tuple[str, ...], device: str, runs: bool) -> None:
    assert declares(declared, torch.device(device)) is runs


def test_a_declaration_takes_a_lone_name_and_refuses_non_devices() -> None:
    assert CacheDeclaration(devices="cuda").devices == ("cuda",)  # type: ignore[arg-type]
    assert CacheDeclaration(devices=("cpu", "cuda:1")).devices == ("cpu", "cuda:1")
    with pytest.raises(ValueError, match=r"CacheDeclaration.devices holds 'gpu' \(a str\); expected .*device names"):
        CacheDeclaration(devices=("gpu",))
    with pytest.raises(ValueError, match=r"CacheDeclaration.devices is empty"):
        CacheDeclaration(devices=())


def _cuda_only(config: kvverify.ModelConfig) -> ContiguousCache:
    raise AssertionError("a cache declared for CUDA only must not be built on the CPU")


_cuda_only.kvverify_declaration = CacheDeclaration(devices=("cuda",))  # type: ignore[attr-defined]


def test_a_device_the_cache_does_not_declare_is_a_usage_error_naming_both() -> None:
    with pytest.raises(TargetError) as caught:
        make_target(_cuda_only, "mine:cuda_only", device="cpu")
    message = str(caught.value)
    assert "target 'mine:cuda_only': the cache declares it runs on cuda" in message
    assert "asked to run on cpu" in message and "--device" in message
    with pytest.raises(TargetError, match=r"declares it runs on cuda .* asked to run on cpu"):
        kvverify.check_cache(_cuda_only, **QUICK)


def test_a_declaration_on_the_cache_object_is_honoured_too() -> None:
    def factory(config: kvverify.ModelConfig) -> ContiguousCache:
        cache = ContiguousCache.from_config(config)
        cache.kvverify_declaration = CacheDeclaration(devices=("cuda:0",))  # type: ignore[attr-defined]
        return cache

    with pytest.raises(TargetError, match=r"runs on cuda:0 \(CacheDeclaration\(devices=\('cuda:0',\)\)\), but the "
                                          "suite was asked to run on cpu"):
        make_target(factory, "mine:late", device="cpu")


def test_a_cache_declared_for_the_cpu_runs_there() -> None:
    def factory(config: kvverify.ModelConfig) -> ContiguousCache:
        return ContiguousCache.from_config(config)

    factory.kvverify_declaration = CacheDeclaration(devices=("cpu",))  # type: ignore[attr-defined]
    assert make_target(factory, "mine:cpu", device="cpu").device == torch.device("cpu")


class _Recording(ContiguousCache):
    """Records the device of every config it is built for and of every tensor ``update`` receives."""

    seen: ClassVar[set[str]] = set()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        position = (cache_kwargs or {}).get("cache_position")
        for tensor in (key_states, value_states, *([position] if position is not None else [])):
            _Recording.seen.add(str(tensor.device))
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


def _recording(config: kvverify.ModelConfig) -> _Recording:
    _Recording.seen.add(f"config:{config.device}")
    return _Recording()


def test_check_cache_on_the_cpu_passes_the_device_to_every_model_and_cache() -> None:
    _Recording.seen = set()
    result = kvverify.check_cache(_recording, device="cpu", **QUICK)
    assert result.ok and result.device == "cpu"
    assert _Recording.seen == {"config:cpu", "cpu"}


def test_check_cache_refuses_a_device_it_cannot_use() -> None:
    with pytest.raises(DeviceError, match=r"device='tpu' is not a device kvverify runs on"):
        kvverify.check_cache(ContiguousCache.from_config, device="tpu", **QUICK)


@no_cuda
def test_check_cache_on_cuda_without_a_gpu_names_cuda() -> None:
    with pytest.raises(DeviceError, match=r"device='cuda' asks for CUDA.*torch.cuda.is_available\(\) is False"):
        kvverify.check_cache(ContiguousCache.from_config, device="cuda", **QUICK)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_check_cache_on_cuda_runs_everything_there() -> None:
    _Recording.seen = set()
    result = kvverify.check_cache(_recording, device="cuda", **{**QUICK, "properties": None})
    assert result.ok and result.device == "cuda"
    assert {s for s in _Recording.seen if not s.startswith("config:")} == {"cuda:0"}
    assert {s for s in _Recording.seen if s.startswith("config:")} == {"config:cuda"}
