"""GPU memory of prefill and decode, and a memory snapshot for https://pytorch.org/memory_viz.

Only runs where ``torch.cuda.is_available()``; :func:`unavailable_reason` says why it cannot otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def unavailable_reason() -> str | None:
    """None when CUDA can be profiled, else why not."""
    if not torch.cuda.is_available():
        return f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    return None


@dataclass(frozen=True)
class CudaPeaks:
    device: str  # the card's name
    prefill_peak_bytes: int  # max_memory_allocated during prefill, above what was allocated before it
    decode_peak_bytes: int  # the same for the decode steps
    held_after_bytes: int  # memory_allocated after generation, above the start


def cuda_peaks(prefill: Callable[[], Any], decode: Callable[[], Any], device: torch.device) -> CudaPeaks:
    """Peak GPU bytes of ``prefill()`` then ``decode()``, each measured from its own reset."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    prefill()
    torch.cuda.synchronize(device)
    prefill_peak = torch.cuda.max_memory_allocated(device) - start
    before_decode = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    decode()
    torch.cuda.synchronize(device)
    decode_peak = torch.cuda.max_memory_allocated(device) - before_decode
    return CudaPeaks(
        device=torch.cuda.get_device_name(device),
        prefill_peak_bytes=prefill_peak,
        decode_peak_bytes=decode_peak,
        held_after_bytes=torch.cuda.memory_allocated(device) - start,
    )


def snapshot(run: Callable[[], Any], path: Path, max_entries: int = 100_000) -> Path:
    """Record allocation history while ``run()`` runs and dump it to ``path`` (a pickle for memory_viz)."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        run()
        torch.cuda.synchronize()
        torch.cuda.memory._dump_snapshot(str(path))  # type: ignore[no-untyped-call]  # torch leaves it untyped
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return path
