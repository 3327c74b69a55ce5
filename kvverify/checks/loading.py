"""Resolving a target (a built-in cache's name or ``MODULE:FACTORY``) into a cache factory, with an error that
says what to do. :func:`resolve_target` is the one resolver every command, the plugin and the repro scripts use.

Everything that can be wrong with a target before the suite runs is answered here or in
:func:`check_cache_object` with one :class:`TargetError` paragraph: what the target is, what was expected,
what came, and what to do about it.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from kvverify.protocol.cache import CacheFactory

_FACTORY_HINT = "FACTORY(config) must take a kvverify.ModelConfig and return a fresh, empty cache"


class TargetError(Exception):
    """The target cannot be used; the message is one paragraph naming the target, what was expected and what came."""


def resolve_target(spec: str) -> CacheFactory:
    """The factory of a built-in cache named ``spec`` (``contiguous``, ``paged``...), else :func:`load_factory`."""
    from kvverify.caches import BUILTIN_CACHES

    if spec in BUILTIN_CACHES:
        return BUILTIN_CACHES[spec]
    if ":" not in spec:
        raise TargetError(
            f"target {spec!r}: expected a built-in cache ({', '.join(BUILTIN_CACHES)}) or MODULE:FACTORY, e.g. "
            f"mypkg.cache:make_cache, where {_FACTORY_HINT}."
        )
    return load_factory(spec)


def load_factory(spec: str) -> CacheFactory:
    """The callable named by ``MODULE:FACTORY`` (``FACTORY`` may be dotted: ``module:Class.from_config``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise TargetError(
            f"target {spec!r}: expected MODULE:FACTORY, e.g. mypkg.cache:make_cache, where {_FACTORY_HINT}."
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise TargetError(
            f"target {spec!r}: module {module_name!r} could not be imported ({type(error).__name__}: {error}"
            f"{raised_at(error)}). It must be importable from the current directory or PYTHONPATH; check the "
            "spelling, run from the directory that holds it, or add its directory to PYTHONPATH."
        ) from error
    factory: object = module
    walked = module_name
    for part in attribute.split("."):
        if not hasattr(factory, part):
            defined = sorted(n for n in dir(factory) if not n.startswith("_"))[:12]
            raise TargetError(
                f"target {spec!r}: {part!r} is not defined in {walked!r}; expected a cache factory there. "
                f"Defined names include: {', '.join(defined) or 'none'}."
            )
        factory = getattr(factory, part)
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    if not callable(factory):
        raise TargetError(
            f"target {spec!r}: {attribute} is a {type(factory).__name__} ({_short_repr(factory)}), not callable; "
            f"expected a function or class where {_FACTORY_HINT}. If it is a cache instance, point at a function "
            "that builds a new one instead: each example needs a fresh cache."
        )
    return factory


def check_cache_object(target: str, cache: object) -> None:
    """Raise :class:`TargetError` unless ``cache`` has callable ``update`` and ``get_seq_length``."""
    if cache is None:
        raise TargetError(
            f"target {target!r}: the factory returned None; expected a cache object with update() and "
            f"get_seq_length(). {_FACTORY_HINT} (a missing `return` statement?)."
        )
    missing = [name for name in ("update", "get_seq_length") if not callable(getattr(cache, name, None))]
    if missing:
        raise TargetError(
            f"target {target!r}: the factory returned a {type(cache).__name__} ({_short_repr(cache)}) with no "
            f"callable {' or '.join(missing)}(); expected a cache speaking kvverify's protocol: "
            "update(key_states, value_states, layer_idx, cache_kwargs) -> (keys, values) and "
            "get_seq_length(layer_idx=0) -> int (see kvverify.KVCache)."
        )


def factory_failed(target: str, error: BaseException) -> TargetError:
    """The error for a factory that raised when called with a config."""
    return TargetError(
        f"target {target!r}: calling the factory with a ModelConfig raised {type(error).__name__}: {error}"
        f"{raised_at(error)}; expected it to return a fresh, empty cache for any config (it may read n_layers, "
        "n_kv_heads, head_dim, max_seq_len, max_batch_size, dtype, device and sliding_window). Call it by hand "
        "with kvverify.ModelConfig() to see the error in full."
    )


def raised_at(error: BaseException) -> str:
    """`` at file:line`` of the innermost frame of the error's traceback, or nothing."""
    frames = traceback.extract_tb(error.__traceback__)
    return f", at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
