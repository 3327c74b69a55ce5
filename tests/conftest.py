"""Unit tests of the library.

Two settings keep the tiers within their budgets without changing what any test checks:

- Tests that start pytest in a subprocess (``pytester``) give it a home directory of its own, and with it an empty
  per-user cache of compiled kernels: every such run would build the native fixed-order kernel again (about 25 s on
  2 cores). ``KVVERIFY_BUILD_DIR`` pins the cache to the one this session uses, so the kernel is built once.
- Under pytest-xdist each worker gets its share of the cores (torch's threads, and ``OMP_NUM_THREADS`` for the
  processes it starts): two workers that each run torch on every core contend for them, and a 2,048-token decode
  of the tiny model takes 21 s instead of 7 s on 2 cores.
"""

from __future__ import annotations

import os

import torch

from kvverify.reference import fixed_order

os.environ.setdefault("KVVERIFY_BUILD_DIR", str(fixed_order.build_dir()))


def _share_of_the_cores() -> int | None:
    """Threads for one pytest-xdist worker (None outside xdist): the cores this process may use over the workers."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or not workers.isdigit() or int(workers) < 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(workers))


if (_threads := _share_of_the_cores()) is not None:
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
