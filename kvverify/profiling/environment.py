"""What a measurement ran on: the machine, torch, threads, dtype and device, named in every report."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch

from kvverify.adapters import transformers_version


@dataclass(frozen=True)
class Environment:
    machine: str  # processor and architecture
    cpu_count: int
    python: str
    torch: str
    transformers: str  # "absent" when not installed
    threads: int  # torch.get_num_threads() during the run
    dtype: str
    device: str  # "cpu" or the CUDA card's name

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe(dtype: torch.dtype, device: str) -> Environment:
    """The environment of the current process for a run in ``dtype`` on ``device``."""
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return Environment(
        machine=f"{_cpu_name()} ({platform.machine()}, {platform.system()})",
        cpu_count=os.cpu_count() or 1,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers_version() or "absent",
        threads=torch.get_num_threads(),
        dtype=str(dtype).removeprefix("torch."),
        device=card,
    )
