"""A cache under test: its factory, what it declares about itself, and what it can do.

Every cache a property builds comes from :meth:`Target.new_cache`, wrapped in a
:class:`~kvverify.suite.contract.CheckedCache` that checks the protocol's contract on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvverify.protocol import CacheDeclaration, CacheFactory, KVCache, capabilities, declaration_of
from kvverify.reference.config import ModelConfig
from kvverify.suite.compare import Tolerance, tolerance_for
from kvverify.suite.contract import CheckedCache, UpdateObserver
from kvverify.suite.devices import declares, resolve_device
from kvverify.suite.loading import TargetError, check_cache_object, factory_failed
from kvverify.suite.watchdog import DEFAULT_TIME_LIMIT, ExampleTimeout, run_with_time_limit

#: The configuration a target is probed with to detect its optional methods.
PROBE_CONFIG = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64,
                           max_batch_size=4)


@dataclass(frozen=True)
class Target:
    """name: how reports call it (``module:factory`` or a built-in name); observe: makes an observer for each
    new cache (used to locate a failure); device: where every model, prompt and cache of the run lives."""

    name: str
    factory: CacheFactory
    declaration: CacheDeclaration = field(default_factory=CacheDeclaration)
    capabilities: frozenset[str] = frozenset()
    observe: Callable[[], UpdateObserver] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def new_cache(self, config: ModelConfig) -> KVCache:
        """A fresh cache from the factory, checked against the contract for a model of ``config``."""
        cache = self.factory(config)
        check_cache_object(self.name, cache)
        return CheckedCache(cache, config, self.observe() if self.observe is not None else None)

    def tolerance(self, config: ModelConfig) -> Tolerance | None:
        """None for a bitwise comparison: strict numerics with an exact cache."""
        if self.declaration.lossy_atol is not None:
            fast = tolerance_for(config.dtype) if config.numerics == "fast" else Tolerance(atol=0.0)
            return Tolerance(atol=self.declaration.lossy_atol + fast.atol, why="declared by the cache (lossy)")
        return tolerance_for(config.dtype) if config.numerics == "fast" else None

    def config_constraints(self) -> dict[str, Any]:
        """Keyword arguments for :func:`kvverify.suite.strategies.cases` that respect the declaration and build
        every model on the target's device."""
        constraints: dict[str, Any] = {"device": self.device}
        d = self.declaration
        if d.sliding_window is not None:
            constraints["sliding_window"] = d.sliding_window
        if d.max_batch_size is not None:
            constraints["max_batch_size"] = d.max_batch_size
        if d.max_seq_len is not None:
            constraints["max_seq_len"] = min(d.max_seq_len, 64)
        return constraints


def make_target(factory: CacheFactory, name: str | None = None, *,
                time_limit: float | None = DEFAULT_TIME_LIMIT, device: str | torch.device | None = None) -> Target:
    """Describe a factory: its declaration (on the factory or on a probe cache) and the optional methods that
    work (present, and not raising ``NotImplementedError`` when tried on a probe cache built on ``device``,
    the CPU when None).

    Raises :class:`~kvverify.suite.devices.DeviceError` for a device this machine lacks, and
    :class:`~kvverify.suite.loading.TargetError` when the cache declares other devices, or the factory raises,
    hangs, returns something that is not a cache, or returns the same object twice.
    """
    label = name or getattr(factory, "__qualname__", None) or repr(factory)
    where = resolve_device(device, option="device=")
    _check_declared_device(label, declaration_of(factory), where)  # before a probe: the cache may need it
    probe_config = PROBE_CONFIG.replace(device=str(where))
    probe, second = _build(factory, label, time_limit, probe_config), _build(factory, label, time_limit, probe_config)
    if probe is second:
        raise TargetError(
            f"target {label!r}: the factory returned the same {type(probe).__name__} object twice; expected a "
            "fresh, empty cache on every call (each example starts from an empty cache). Build a new one inside "
            "the factory."
        )
    declaration = declaration_of(probe, factory)
    _check_declared_device(label, declaration, where)
    offered = capabilities(probe)
    working = frozenset(m for m in offered if _works(factory, m, probe_config)) if offered else offered
    return Target(label, factory, declaration, working, device=where)


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
        cache: object = run_with_time_limit(lambda: factory(config), time_limit, f"target {label!r}: the factory")
    except ExampleTimeout as timeout:
        raise TargetError(str(timeout)) from None
    except Exception as error:
        raise factory_failed(label, error) from error
    check_cache_object(label, cache)
    return cache


def _works(factory: CacheFactory, method: str, c: ModelConfig) -> bool:
    """False when the method raises NotImplementedError on a probe cache holding two tokens per layer."""
    try:
        cache = factory(c)
        for layer in range(c.n_layers):
            kv = torch.zeros(1, c.n_kv_heads, 2, c.head_dim, dtype=c.dtype, device=c.device)
            cache.update(kv, kv.clone(), layer, {"cache_position": torch.arange(2, device=c.device)})
    except Exception:
        return True  # the properties will say what is wrong with update()
    call: dict[str, Callable[[], object]] = {
        "crop": lambda: cache.crop(1),  # type: ignore[attr-defined]
        "reorder_cache": lambda: cache.reorder_cache(  # type: ignore[attr-defined]
            torch.zeros(1, dtype=torch.long, device=c.device)),
        "reset": lambda: cache.reset(),  # type: ignore[attr-defined]
    }
    try:
        call[method]()
    except NotImplementedError:
        return False
    except Exception:
        return True
    return True
