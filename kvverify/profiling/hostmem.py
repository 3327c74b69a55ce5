"""Host memory: bytes a cache's tensors hold, and memray's view of what a piece of code allocates.

torch allocates CPU tensors with ``posix_memalign``, below Python's allocator, so ``tracemalloc`` does not see
them (:func:`tracemalloc_vs_memray` shows it); memray hooks the C allocator and does.
"""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: memray allocator kinds that hand out memory (frees and unmaps are not counted as churn).
_ALLOCATING = (
    "MALLOC",
    "CALLOC",
    "REALLOC",
    "POSIX_MEMALIGN",
    "ALIGNED_ALLOC",
    "MEMALIGN",
    "VALLOC",
    "PVALLOC",
    "MMAP",
)


def tensors_held(obj: object, *, depth: int = 4) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts, ``depth`` levels deep."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(value: object, level: int) -> None:
        if id(value) in seen or level < 0:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, level - 1)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, level - 1)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for item in vars(value).values():
                walk(item, level - 1)

    walk(obj, depth)
    return found


def held_bytes(obj: object) -> int:
    """Bytes of the storages behind the tensors ``obj`` holds, each storage counted once (views share one)."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in tensors_held(obj):
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@dataclass(frozen=True)
class Allocations:
    """What memray saw while a callable ran."""

    peak_bytes: int  # the most bytes live at once, counting only allocations made while tracking
    total_bytes: int  # every byte handed out (the churn), freed or not
    count: int  # allocations made


def memray_allocations(run: Callable[[], Any]) -> Allocations:
    """Run ``run()`` under a memray Tracker and read back the peak and total bytes allocated."""
    import memray

    kinds = {getattr(memray.AllocatorType, name) for name in _ALLOCATING}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "allocations.bin")
        with memray.Tracker(destination=memray.FileDestination(path, overwrite=True)):
            run()
        reader = memray.FileReader(path)
        total = count = 0
        for record in reader.get_allocation_records():
            if record.allocator in kinds:
                total += record.size
                count += 1
        peak = int(reader.metadata.peak_memory)
        reader.close()
    return Allocations(peak_bytes=peak, total_bytes=total, count=count)


def tracemalloc_vs_memray(nbytes: int = 8 << 20) -> tuple[int, int]:
    """Peak bytes that tracemalloc and memray each report while one float32 tensor of ``nbytes`` is allocated."""
    elements = nbytes // 4
    tracemalloc.start()
    torch.empty(elements, dtype=torch.float32).fill_(1.0)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seen = memray_allocations(lambda: torch.empty(elements, dtype=torch.float32).fill_(1.0)).peak_bytes
    return traced, seen
