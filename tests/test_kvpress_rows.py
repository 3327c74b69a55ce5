"""kvpress' place in verify-libs, checked where kvpress is not installed (the main env): its rows say which env
runs them, and a run of some libraries judges only their known failures (the kvpress env holds transformers 5.2,
where transformers' own entries' fixed examples do not apply)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvverify.adapters.known import KNOWN_FAILURES, registry
from kvverify.adapters.libraries import LIBRARY_CACHES


def test_the_kvpress_rows_name_their_env_when_kvpress_is_missing() -> None:
    if importlib.util.find_spec("kvpress") is not None:
        pytest.skip("kvpress is installed here: its rows run")
    rows = [entry for entry in LIBRARY_CACHES if entry.library == "kvpress"]
    assert len(rows) == 5
    assert {entry.unavailable(torch.device("cpu")) for entry in rows} == {
        "needs kvpress, not installed (its own env: tox -e lib-kvpress)"}


def test_a_registry_of_some_caches_holds_only_their_entries() -> None:
    names = [entry.name for entry in registry().only({"kvpress-streaming-llm"}).entries]
    assert names == ["kvpress-streaming-llm-sinks-by-tie"]
    assert len(registry().entries) == len(KNOWN_FAILURES)
