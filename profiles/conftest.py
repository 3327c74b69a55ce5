"""Shared fixtures of the time and memory profiles (run by ``tox -e bench`` and ``tox -e memory``)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel
from kvverify.reference.threads import torch_threads

#: Context lengths of the time profiles, per preset (each within the preset's max_seq_len).
LENGTHS: dict[str, tuple[int, ...]] = {"bench": (64, 256, 512, 1024, 2048), "tiny": (16, 64, 120)}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benchmark: a pytest-benchmark time profile (tox -e bench)")
    config.addinivalue_line("markers", "memory: a memray host-memory profile or limit_memory gate (tox -e memory)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped with a reason without one")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Timings at one torch thread, as the README's figures are."""
    with torch_threads(1):
        yield


def fast_config(preset: str, **overrides: Any) -> ModelConfig:
    return ModelConfig.preset(preset, numerics="fast", **overrides)


@functools.cache
def reference(config: ModelConfig) -> ReferenceModel:
    """One reference model per configuration for the whole session."""
    return ReferenceModel(config)


def tokens(config: ModelConfig, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator)  # (1, length)
