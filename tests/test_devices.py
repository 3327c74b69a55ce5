"""The device option: names parsed and checked in one place (:mod:`kvverify.suite.devices`), CUDA refused with
one paragraph on a machine without it, ``CacheDeclaration(devices=...)`` honoured, and the device passed
through ``check_cache`` to every model, prompt and cache of the run."""

from __future__ import annotations

import pytest
import torch

from kvverify.suite.devices import DeviceError, declares, describe_device, parse_device, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


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
