"""Host memory of the caches: limit_memory gates on the footprint at a fixed shape, and allocation churn.

Run with ``pytest profiles -m memory --memray`` (tox -e memory). The gates replay one generation's cache
updates (bench shape, batch 1, 512 tokens; the sliding cache with a 256-token window) without the model, so
the figure is the cache's own; each limit is the analytical prediction plus a small margin for the replay's
bookkeeping. Churn is measured by memray in a child process, since pytest-memray's tracker owns this one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling import analysis
from kvverify.profiling.hostmem import held_bytes
from kvverify.profiling.plan import BUILTIN_LAYOUTS
from kvverify.profiling.replay import UpdatePlan, replay
from profiles.conftest import fast_config

pytestmark = pytest.mark.memory
LENGTH, WINDOW = 512, 256
PLAN = UpdatePlan(batch=1, prompt=16, length=LENGTH)


def _config(name: str) -> Any:
    return fast_config("bench", sliding_window=WINDOW if name == "sliding" else None)


def _fill(name: str) -> Any:
    config = _config(name)
    return replay(BUILTIN_CACHES[name], config, PLAN)()


@pytest.mark.limit_memory("2 MB")
def test_contiguous_footprint() -> None:
    """1 MiB of K/V for 512 tokens; each concatenation briefly holds the old and the new tensor."""
    assert held_bytes(_fill("contiguous")) == analysis.kv_bytes(_config("contiguous"), LENGTH)


@pytest.mark.limit_memory("1.5 MB")
def test_sliding_footprint() -> None:
    """A 256-token ring: 0.5 MiB whatever the length; the gathered window it returns is transient."""
    assert held_bytes(_fill("sliding")) == analysis.kv_bytes(_config("sliding"), LENGTH, window=WINDOW)


@pytest.mark.limit_memory("66 MB")
def test_static_footprint() -> None:
    """max_batch_size 8 × max_seq_len 4096 preallocated: 64 MiB, and nothing more as it fills."""
    config = _config("static")
    assert held_bytes(_fill("static")) == analysis.predicted_cache_bytes("preallocated", config, LENGTH)


@pytest.mark.limit_memory("66 MB")
def test_paged_footprint() -> None:
    """The block pool is allocated up front (64 MiB); gathering the blocks back costs a transient copy."""
    config = _config("paged")
    assert held_bytes(_fill("paged")) == analysis.predicted_cache_bytes("paged", config, LENGTH)


CHURN_SCRIPT = """
import json
from kvverify.caches import BUILTIN_CACHES
from kvverify.protocol.config import ModelConfig
from kvverify.profiling.hostmem import memray_allocations
from kvverify.profiling.replay import UpdatePlan, replay
out = {}
for name, factory in BUILTIN_CACHES.items():
    config = ModelConfig.preset("bench", numerics="fast", sliding_window=256 if name == "sliding" else None)
    seen = memray_allocations(replay(factory, config, UpdatePlan(batch=1, prompt=16, length=512)))
    out[name] = {"total": seen.total_bytes, "peak": seen.peak_bytes}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def churn() -> dict[str, dict[str, int]]:
    done = subprocess.run([sys.executable, "-c", CHURN_SCRIPT], capture_output=True, text=True, check=True)
    table: dict[str, dict[str, int]] = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nallocation churn over 512 tokens (bench):", table)
    return table


def test_concatenating_cache_reallocates_every_step(churn: dict[str, dict[str, int]]) -> None:
    held = analysis.kv_bytes(_config("contiguous"), LENGTH)
    total = churn["contiguous"]["total"]
    assert total > 100 * held, (
        f"a torch.cat cache should allocate ~length/2 times what it holds; got {total} for {held}"
    )


def test_preallocated_cache_allocates_once(churn: dict[str, dict[str, int]]) -> None:
    capacity = analysis.predicted_cache_bytes(BUILTIN_LAYOUTS["static"], _config("static"), LENGTH)
    total = churn["static"]["total"]
    assert total < 1.2 * capacity, f"StaticCache should allocate its buffers once ({capacity} B); memray saw {total} B"
