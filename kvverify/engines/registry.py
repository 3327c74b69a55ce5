"""The engines ``kvverify verify-engine`` knows, by name; each adapter's module is imported only when chosen, and
an adapter imports its engine only when it runs (so ``vllm`` is listed, and refused with a clear message, where
vLLM is not installed)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from kvverify.engines.adapter import EngineAdapter

#: name -> "module:class" of its adapter.
ENGINES: dict[str, str] = {
    "transformers": "kvverify.engines.transformers_cb:TransformersEngine",  # bit for bit, batch-invariant kernels
    "vllm": "kvverify.engines.vllm_engine:VllmEngine",  # within a measured tolerance: its kernels are its own C++
}
#: Engines that live in an environment of their own: name -> its tox env.
TOX_ENVS: dict[str, str] = {"vllm": "engine-vllm"}


def get_engine(name: str) -> EngineAdapter:
    """The adapter named ``name``, or ValueError naming the known engines."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of: {', '.join(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    return cast("EngineAdapter", getattr(importlib.import_module(module_name), class_name)())
