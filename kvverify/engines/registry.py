"""The engines ``kvverify verify-engine`` knows, by name; each adapter's module is imported only when chosen."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from kvverify.engines.adapter import EngineAdapter

#: name -> "module:class" of its adapter, for the engines checked bit for bit under the batch-invariant kernels
#: (:mod:`kvverify.engines.runner`).
ENGINES: dict[str, str] = {
    "transformers": "kvverify.engines.transformers_cb:TransformersEngine",
}

#: Engines whose kernels kvverify cannot reach (their own C++), checked within a measured tolerance by a check
#: of their own: name -> its module (``run_check``, ``as_suite``, ``format_table``, ``summary``), and the tox env
#: it runs in.
TOLERANCE_ENGINES: dict[str, tuple[str, str]] = {
    "vllm": ("kvverify.engines.vllm_check", "engine-vllm"),
}


def get_engine(name: str) -> EngineAdapter:
    """The adapter named ``name``, or ValueError naming the known engines."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of: {', '.join(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    return cast("EngineAdapter", getattr(importlib.import_module(module_name), class_name)())
