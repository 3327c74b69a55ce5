"""The device a run uses: ``cpu``, ``cuda`` or ``cuda:N``, parsed and checked in one place.

Every entry point (``kvverify verify --device``, ``mutants --device``, ``profile --device``, the plugin's
``--kv-device`` / ``KVVERIFY_DEVICE``, ``check_cache(device=)``) resolves its text with :func:`resolve_device`,
so a wrong name or a missing GPU is one clear :class:`DeviceError` paragraph before anything runs.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvverify.protocol.config import device_name

#: What :func:`resolve_device` accepts, as the messages spell it.
ACCEPTED = "cpu, cuda or cuda:N (N the index of a GPU, e.g. cuda:0)"


class DeviceError(ValueError):
    """The device asked for is not one kvverify runs on, or this machine does not have it; the message is one
    paragraph: what was asked, what this machine has, what to do."""


def parse_device(value: str | torch.device, *, option: str = "--device") -> torch.device:
    """The device ``value`` names (``cpu``, ``cuda``, ``cuda:N``), without asking whether this machine has it.

    ``option`` names where the value came from, as the messages spell it: ``--device``, ``--kv-device``,
    ``device=`` (a keyword argument)."""
    name = device_name(value if isinstance(value, torch.device) else str(value).strip().lower())
    if name is None:
        raise DeviceError(
            f"{_spelled(option, str(value))} is not a device kvverify runs on; expected {ACCEPTED}. "
            f"Use {_spelled(option, 'cpu')}, or {_spelled(option, 'cuda')} on a machine with an NVIDIA GPU."
        )
    device = torch.device(name)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(
            f"{_spelled(option, str(value))} names the {device.type} backend; kvverify runs on {ACCEPTED}. "
            f"Use {_spelled(option, 'cpu')}, or {_spelled(option, 'cuda')} on a machine with an NVIDIA GPU."
        )
    return device


def resolve_device(value: str | torch.device | None = None, *, option: str = "--device") -> torch.device:
    """The device ``value`` names, checked against this machine (None: ``cpu``).

    Raises :class:`DeviceError` for an unknown name, for CUDA on a machine without it, and for ``cuda:N`` past
    the last GPU.
    """
    device = parse_device("cpu" if value is None else value, option=option)
    if device.type == "cuda":
        _require_cuda(device, option)
    return device


def _require_cuda(device: torch.device, option: str) -> None:
    asked = f"{_spelled(option, str(device))} asks for CUDA"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            build = f"torch {torch.__version__} is a build without CUDA"
            fix = "install a CUDA build of torch on a machine with an NVIDIA GPU"
        else:
            build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU "
                     "(no driver, or CUDA_VISIBLE_DEVICES hides them)")
            fix = "check nvidia-smi and CUDA_VISIBLE_DEVICES"
        raise DeviceError(
            f"{asked}, but this machine has none: torch.cuda.is_available() is False ({build}). "
            f"Run on the CPU ({_spelled(option, 'cpu')}), or {fix} and try again."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"{asked} on GPU {device.index}, but this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; pick one of those (cuda alone is the current one)."
        )


def _spelled(option: str, value: str) -> str:
    """``--device cuda`` for an option, ``device='cuda'`` for a keyword argument."""
    if option.endswith("="):
        return f"{option}{value!r}"
    return f"{option} {value or repr(value)}"


def describe_device(device: torch.device) -> str:
    """``cpu``, or the CUDA device with its card's name: ``cuda:0 (NVIDIA H200)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def declares(devices: Sequence[str], device: torch.device) -> bool:
    """Whether a cache that declares ``devices`` runs on ``device``: ``"cuda"`` covers every GPU, ``"cuda:1"``
    only that one (``cuda`` alone counts as ``cuda:0``)."""
    for entry in devices:
        declared = torch.device(entry)
        if declared.type != device.type:
            continue
        if declared.index is None or declared.index == (device.index or 0):
            return True
    return False
