"""A cache under test: its factory, what it declares about itself, and what it can do.

Every cache a property builds comes from :meth:`Target.new_cache`, wrapped in a
:class:`~kvverify.checks.contract.CheckedCache` that checks the protocol's contract on every call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from kvverify.checks.compare import Tolerance, tolerance_for
from kvverify.checks.contract import CheckedCache, UpdateObserver
from kvverify.checks.devices import declares, resolve_device
from kvverify.checks.loading import TargetError, check_cache_object, factory_failed
from kvverify.checks.positional import RotatingCache
from kvverify.checks.shapes import shape_space
from kvverify.checks.watchdog import DEFAULT_TIME_LIMIT, ExampleTimeout, run_with_time_limit
from kvverify.protocol.cache import CacheDeclaration, CacheFactory, KVCache, capabilities, declaration_of
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.declaration import DeclarationError

#: The configuration a target is probed with to detect its optional methods.
PROBE_CONFIG = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64,
                           max_batch_size=4)


@dataclass(frozen=True)
class Target:
    """name: how reports call it (``module:factory`` or a built-in name); observe: makes an observer for each
    new cache (used to locate a failure); device: where every model, prompt and cache of the run lives;
    shapes: the shape space drawn from (:mod:`kvverify.checks.shapes`)."""

    name: str
    factory: CacheFactory
    declaration: CacheDeclaration = field(default_factory=CacheDeclaration)
    capabilities: frozenset[str] = frozenset()
    observe: Callable[[], UpdateObserver] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shapes: str = "default"

    def new_cache(self, config: ModelConfig) -> KVCache:
        """A fresh cache from the factory (``factory(config, batch_size=config.max_batch_size)`` when it takes a
        batch size), checked against the contract for a model of ``config``; a cache that applies RoPE itself
        is fed keys before rotation (:class:`~kvverify.checks.positional.RotatingCache`)."""
        cache: Any = call_factory(self.factory, config)
        check_cache_object(self.name, cache)
        if self.declaration.positional == "rope":
            cache = RotatingCache(cache, config)
        return CheckedCache(cache, config, self.observe() if self.observe is not None else None,
                            keeps_subset=self.declaration.keeps is not None)

    def tolerance(self, config: ModelConfig) -> Tolerance | None:
        """None for a bitwise comparison: strict numerics with an exact cache."""
        inexact = config.numerics == "fast" or self.declaration.positional == "rope"  # un-rotating is inexact
        if self.declaration.lossy_atol is not None:
            fast = tolerance_for(config.dtype) if inexact else Tolerance(atol=0.0)
            return Tolerance(atol=self.declaration.lossy_atol + fast.atol, why="declared by the cache (lossy)")
        return tolerance_for(config.dtype) if inexact else None

    def config_constraints(self) -> dict[str, Any]:
        """Keyword arguments for :func:`kvverify.checks.strategies.cases` that respect the declaration and build
        every model on the target's device."""
        constraints: dict[str, Any] = {"device": self.device, "shapes": self.shapes}
        d = self.declaration
        if d.sliding_window is not None:
            constraints["sliding_window"] = d.sliding_window
        if d.largest_batch is not None:
            constraints["max_batch_size"] = d.largest_batch
        if d.max_seq_len is not None:
            constraints["longest"] = d.max_seq_len
        for name in ("head_dims", "dtypes", "batch_sizes", "block_size"):
            if getattr(d, name) is not None:
                constraints[name] = getattr(d, name)
        if d.positional == "rope":
            constraints["positional"], constraints["left_padding"] = "rope", False
        if d.keeps is not None:  # the oracle's mask reads kept slots as unpadded, unwindowed, without ALiBi
            constraints["left_padding"], constraints["sliding_window"] = False, st.none()
            if d.positional is None:
                constraints["positional"] = ("rope", "learned", "none")
        return constraints


def takes_batch_size(factory: CacheFactory) -> bool:
    """Whether the factory has a ``batch_size`` parameter (or takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(p.name == "batch_size" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def call_factory(factory: CacheFactory, config: ModelConfig) -> object:
    """``factory(config, batch_size=config.max_batch_size)`` when it takes a batch size, else ``factory(config)``."""
    if takes_batch_size(factory):
        return factory(config, batch_size=config.max_batch_size)  # type: ignore[call-arg]
    return factory(config)


def make_target(factory: CacheFactory, name: str | None = None, *,
                time_limit: float | None = DEFAULT_TIME_LIMIT, device: str | torch.device | None = None,
                shapes: str = "default") -> Target:
    """Describe a factory: its declaration (on the factory or on a probe cache) and the optional methods that
    work (present, and not raising ``NotImplementedError`` when tried on a probe cache built on ``device``,
    the CPU when None).

    Raises :class:`~kvverify.checks.devices.DeviceError` for a device this machine lacks, and
    :class:`~kvverify.checks.loading.TargetError` when the cache declares other devices, or the factory raises,
    hangs, returns something that is not a cache, or returns the same object twice.
    """
    label = name or getattr(factory, "__qualname__", None) or repr(factory)
    where = resolve_device(device, option="device=")
    shape_space(shapes, where)  # an unknown name fails here, before any cache is built
    declared = _declaration(label, factory)
    _check_declared_device(label, declared, where)  # before a probe: the cache may need it
    probe_config = probe_config_for(declared, where)
    probe, second = _build(factory, label, time_limit, probe_config), _build(factory, label, time_limit, probe_config)
    if probe is second:
        raise TargetError(
            f"target {label!r}: the factory returned the same {type(probe).__name__} object twice; expected a "
            "fresh, empty cache on every call (each example starts from an empty cache). Build a new one inside "
            "the factory."
        )
    declaration = _declaration(label, probe, factory)
    _check_declared_device(label, declaration, where)
    offered = capabilities(probe)
    working = frozenset(m for m in offered if _works(factory, m, probe_config)) if offered else offered
    return Target(label, factory, declaration, working, device=where, shapes=shapes)


def _declaration(label: str, *objects: object) -> CacheDeclaration:
    try:
        return declaration_of(*objects)
    except DeclarationError as error:
        raise TargetError(f"target {label!r}: {error}") from None


def probe_config_for(declared: CacheDeclaration, device: torch.device) -> ModelConfig:
    """The probe's configuration, within what the cache declares (its first head_dim, dtype and batch size)."""
    changes: dict[str, Any] = {"device": str(device)}
    if declared.head_dims:
        changes["head_dim"] = declared.head_dims[0]
    if declared.dtypes:
        changes["dtype"] = declared.dtypes[0]
    if declared.largest_batch is not None:
        changes["max_batch_size"] = (declared.batch_sizes or (declared.largest_batch,))[0]
    if declared.max_seq_len is not None:
        changes["max_seq_len"] = min(declared.max_seq_len, PROBE_CONFIG.max_seq_len)
    if declared.sliding_window is not None:
        changes["sliding_window"] = declared.sliding_window
    return PROBE_CONFIG.replace(**changes)


def _check_declared_device(label: str, declaration: CacheDeclaration, device: torch.device) -> None:
    """A usage error naming both when the cache declares devices and ``device`` is not one of them."""
    if declaration.devices is None or declares(declaration.devices, device):
        return
    declared = ", ".join(declaration.devices)
    raise TargetError(
        f"target {label!r}: the cache declares it runs on {declared} (CacheDeclaration(devices="
        f"{declaration.devices!r})), but the suite was asked to run on {device}. Ask for {declared} instead "
        "(kvverify verify --device, pytest --kv-device, check_cache(device=)), or add "
        f"{device.type!r} to the declaration if the cache runs there."
    )


def _build(factory: CacheFactory, label: str, time_limit: float | None, config: ModelConfig) -> object:
    try:
        cache: object = run_with_time_limit(lambda: call_factory(factory, config), time_limit,
                                            f"target {label!r}: the factory")
    except ExampleTimeout as timeout:
        raise TargetError(str(timeout)) from None
    except Exception as error:
        raise factory_failed(label, error) from error
    check_cache_object(label, cache)
    return cache


def _works(factory: CacheFactory, method: str, c: ModelConfig) -> bool:
    """False when the method raises NotImplementedError on a probe cache holding two tokens per layer."""
    try:
        cache: Any = call_factory(factory, c)
        for layer in range(c.n_layers):
            kv = torch.zeros(c.max_batch_size, c.n_kv_heads, 2, c.head_dim, dtype=c.dtype, device=c.device)
            cache.update(kv, kv.clone(), layer, {"cache_position": torch.arange(2, device=c.device)})
    except Exception:
        return True  # the properties will say what is wrong with update()
    call: dict[str, Callable[[], object]] = {
        "crop": lambda: cache.crop(1),
        "reorder_cache": lambda: cache.reorder_cache(
            torch.zeros(c.max_batch_size, dtype=torch.long, device=c.device)),
        "reset": lambda: cache.reset(),
    }
    try:
        call[method]()
    except NotImplementedError:
        return False
    except Exception:
        return True
    return True
