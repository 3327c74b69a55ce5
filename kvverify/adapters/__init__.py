"""Bridges to other libraries: the reference model as a transformers model, transformers' caches as targets.

Each adapter module imports its library lazily and says how to install it when it is missing:
:mod:`kvverify.adapters.llama` (the reference weights in ``LlamaForCausalLM``) and :mod:`kvverify.adapters.hf`
(transformers' cache classes as ``FACTORY(config)`` targets, e.g. ``kvverify.adapters.hf:static_cache``).
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "pip install 'kvverify[transformers]'"


def import_transformers() -> ModuleType:
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"this adapter needs transformers, which is not installed; run: {INSTALL_HINT}") from error
    return transformers
