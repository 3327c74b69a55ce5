"""Property tests run the packaged suite (kvverify.checks, run by kvverify.runs) against the built-in caches.

The Hypothesis profile is kvverify's ``ci`` unless ``--hypothesis-profile`` names another
(``kvverify-dev``, ``kvverify-ci``, ``kvverify-thorough``); ``--hypothesis-seed`` fixes the seed;
``KVVERIFY_DEVICE=cuda`` runs them on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from kvverify.caches import BUILTIN_CACHES
from kvverify.checks import make_target
from kvverify.checks.devices import resolve_device
from kvverify.checks.target import Target
from kvverify.reference.threads import torch_threads
from kvverify.runs.settings import register_profiles

register_profiles()


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("kvverify-ci")


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed", None)
    shown = seed if seed is not None else "random"
    return f"kvverify: hypothesis profile {settings.get_current_profile_name()}, seed {shown}"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(params=sorted(BUILTIN_CACHES), scope="module")
def builtin_target(request: pytest.FixtureRequest) -> Target:
    """A built-in cache, on the device ``KVVERIFY_DEVICE`` names (the CPU when unset)."""
    device = resolve_device(os.environ.get("KVVERIFY_DEVICE"), option="KVVERIFY_DEVICE=")
    return make_target(BUILTIN_CACHES[request.param], request.param, device=device)

