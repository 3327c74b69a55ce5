"""Bridges to other libraries, one per library: the only place that library is imported.

:mod:`kvverify.adapters.hf` is transformers': one registry of its caches (``kvverify.adapters.hf.CACHES``, read
by ``verify-hf``, ``profile`` and ``mutants``), its caches as ``FACTORY(config)`` targets (e.g.
``kvverify.adapters.hf:static_cache``), tiny transformers models, the reference weights in
``LlamaForCausalLM``, and greedy generation with them. transformers is imported lazily, through
:func:`import_transformers`, which says how to install it when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'kvverify[transformers]'"


def import_transformers(submodule: str | None = None) -> ModuleType:
    """The ``transformers`` module (or ``transformers.<submodule>``), or an ImportError that says how to
    install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"this adapter needs transformers, which is not installed; run: {INSTALL_HINT}") from error
    return transformers if submodule is None else importlib.import_module(f"transformers.{submodule}")


def import_library(module: str, *, needs: str, install: str, who: str = "this adapter") -> ModuleType:
    """``module``, or an ImportError naming what ``who`` needs, why the import failed and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{who} needs {needs}, which could not be imported ({error}); run: {install}") from error


def transformers_version() -> str | None:
    """The installed transformers' version, or None when it is not installed."""
    try:
        return str(import_transformers().__version__)
    except ImportError:
        return None
