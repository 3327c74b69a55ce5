"""The pytest plugin: ``pytest --kv-cache=MODULE:FACTORY`` runs kvverify's property suite against a cache.

Registered through ``[project.entry-points.pytest11]``, so it loads in every pytest run once kvverify is
installed: this module imports only pytest at load time; torch, Hypothesis strategies and the suite are
imported once a target is named (``--kv-cache`` or the ``KVVERIFY_CACHE`` environment variable).

With a target, the session gains one test item per property of :data:`kvverify.suite.PROPERTIES`, named
``kvverify[MODULE:FACTORY]::PROPERTY`` (select with ``-k``), skipped with the reason when the cache lacks an
optional method the property needs. A failure's report is the suite's: the minimal case, where the cache
first went wrong, and the command that reproduces it.

Fixtures, for tests of your own: ``kv_cache_factory`` (the target's factory), ``kv_target`` (its
:class:`~kvverify.suite.Target`), ``kv_reference_model`` (``(config, seed=0) -> ReferenceModel``) and
``kv_cases`` (:func:`kvverify.suite.strategies.cases` bound to the target's declared constraints and device).
``--kv-device`` (or ``KVVERIFY_DEVICE``) puts the models, prompts and caches on ``cpu``, ``cuda`` or ``cuda:N``.
Markers: ``kvverify`` (on the generated items) and ``kv_needs(*methods)`` (skip unless the target has them).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kvverify.protocol import CacheFactory
    from kvverify.reference.model import ReferenceModel
    from kvverify.suite import Property, PropertyResult, Target

#: The environment variable that names a target when ``--kv-cache`` is not given.
ENV_TARGET = "KVVERIFY_CACHE"
#: The environment variable that names the device when ``--kv-device`` is not given.
ENV_DEVICE = "KVVERIFY_DEVICE"
_STATE = "kvverify-target"
PROFILES = ("dev", "ci", "thorough")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvverify", "kvverify: run the KV-cache property suite against a cache")
    group.addoption("--kv-cache", metavar="MODULE:FACTORY", default=None,
                    help=f"run the property suite against the caches FACTORY(config) builds (or set {ENV_TARGET})")
    group.addoption("--kv-profile", choices=PROFILES, default="ci",
                    help="examples per property: dev 50, ci 200, thorough 2000 (default: ci)")
    group.addoption("--kv-max-examples", type=int, default=None, metavar="N",
                    help="override the profile's examples per property")
    group.addoption("--kv-seed", type=int, default=None, metavar="N", help="Hypothesis seed (default: random, shown)")
    group.addoption("--kv-time-limit", type=float, default=None, metavar="SECONDS",
                    help="seconds one example may take before the cache is reported as hanging (default: 60)")
    group.addoption("--kv-shapes", choices=("default", "production"), default="default",
                    help="default: toy models (fast); production: head_dim 64/128, GQA up to 8, bf16/fp16, "
                    "blocks of 16, contexts to 4096 (default: default)")
    group.addoption("--kv-device", metavar="DEVICE", default=None,
                    help=f"where the models, prompts and caches live: cpu, cuda or cuda:N (or set {ENV_DEVICE}; "
                    "default: cpu)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvverify: a property of kvverify's suite, run against the --kv-cache target")
    config.addinivalue_line(
        "markers", "kv_needs(*methods): skip unless the --kv-cache target has these optional methods "
        "(crop, reorder_cache, reset)")
    spec = config.getoption("kv_cache") or os.environ.get(ENV_TARGET) or None
    if spec is not None:
        config.pluginmanager.register(_TargetSession.load(config, spec), _STATE)


def _session(config: pytest.Config) -> _TargetSession | None:
    state = config.pluginmanager.get_plugin(_STATE)
    return state if isinstance(state, _TargetSession) else None


class _TargetSession:
    """The target of this pytest run and the settings its properties run with; also a plugin (its hooks)."""

    def __init__(self, spec: str, factory: CacheFactory, target: Target, profile: str, seed: int,
                 max_examples: int | None, time_limit: float, device_option: str | None = None) -> None:
        self.spec, self.factory, self.target, self.device_option = spec, factory, target, device_option
        self.profile, self.seed, self.max_examples, self.time_limit = profile, seed, max_examples, time_limit

    @classmethod
    def load(cls, config: pytest.Config, spec: str) -> _TargetSession:
        from kvverify.suite import make_target
        from kvverify.suite.devices import DeviceError, resolve_device
        from kvverify.suite.loading import TargetError, load_factory
        from kvverify.suite.watchdog import DEFAULT_TIME_LIMIT

        max_examples = config.getoption("kv_max_examples")
        if max_examples is not None and max_examples < 1:
            raise pytest.UsageError(f"--kv-max-examples must be >= 1; got {max_examples}")
        time_limit = config.getoption("kv_time_limit") or DEFAULT_TIME_LIMIT
        device_option = config.getoption("kv_device") or os.environ.get(ENV_DEVICE) or None
        option = "--kv-device" if config.getoption("kv_device") else ENV_DEVICE + "="
        try:
            device = resolve_device(device_option, option=option)
            factory = load_factory(spec)
            target = make_target(factory, spec, time_limit=time_limit, device=device,
                                 shapes=config.getoption("kv_shapes"))
        except (DeviceError, TargetError) as error:
            raise pytest.UsageError(f"kvverify: {error}") from None
        seed = config.getoption("kv_seed")
        return cls(spec, factory, target, config.getoption("kv_profile"),
                   random.randrange(2**32) if seed is None else seed, max_examples, time_limit, device_option)

    def reproduce(self, name: str) -> str:
        parts = [f"pytest --kv-cache={self.spec} --kv-profile={self.profile} --kv-seed={self.seed}"]
        if self.max_examples is not None:
            parts.append(f"--kv-max-examples={self.max_examples}")
        if self.target.device.type != "cpu":
            parts.append(f"--kv-device={self.device_option}")
        if self.target.shapes != "default":
            parts.append(f"--kv-shapes={self.target.shapes}")
        return " ".join([*parts, f"-k {name}"])

    def pytest_report_header(self, config: pytest.Config) -> str:
        capabilities = ", ".join(sorted(self.target.capabilities)) or "none"
        return (f"kvverify: target {self.spec}, profile {self.profile}, seed {self.seed}, "
                f"device {self.target.device}, shapes {self.target.shapes}, optional methods: {capabilities}, "
                f"{self.target.declaration.describe()}")

    @pytest.hookimpl(tryfirst=True)  # before -k and -m deselect
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        suite = _Suite.from_parent(session, name=f"kvverify[{self.spec}]", nodeid=f"kvverify[{self.spec}]")
        suite.state = self
        items.extend(session.genitems(suite))  # reported as collected, like items from files

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        for marker in item.iter_markers("kv_needs"):
            missing = sorted(set(marker.args) - self.target.capabilities)
            if missing:
                pytest.skip(f"the cache {self.spec} has no {', '.join(f'{m}()' for m in missing)}")


class _Suite(pytest.Collector):
    """The parent of the generated items (they come from no file): one per property of the suite."""

    state: _TargetSession

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        from kvverify.suite import PROPERTIES

        return [PropertyItem.from_parent(self, name=name, prop=prop, state=self.state)
                for name, prop in PROPERTIES.items()]


class PropertyFailed(Exception):
    def __init__(self, result: PropertyResult, reproduce: str) -> None:
        self.result, self.reproduce = result, reproduce
        super().__init__(result.detail)


class PropertyItem(pytest.Item):
    """One property of the suite against the session's target."""

    def __init__(self, *, prop: Property, state: _TargetSession, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prop, self.state = prop, state
        self.add_marker("kvverify")

    def runtest(self) -> None:
        from kvverify.suite import run_property

        state = self.state
        missing = sorted(self.prop.needs - state.target.capabilities)
        if missing:
            pytest.skip(f"the cache {state.spec} has no {', '.join(f'{m}()' for m in missing)}")
        result = run_property(self.prop, state.target, profile=state.profile, seed=state.seed,
                              time_limit=state.time_limit, max_examples=state.max_examples)
        if result.verdict in ("failed", "error"):
            raise PropertyFailed(result, state.reproduce(self.prop.name))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, PropertyFailed):
            failure = excinfo.value
            verdict = "failed" if failure.result.verdict == "failed" else "could not run (an error of the suite)"
            return (f"property {self.prop.name} {verdict} for {self.state.spec} after "
                    f"{failure.result.examples} passing examples:\n\n{failure.result.detail}\n\n"
                    f"reproduce: {failure.reproduce}")
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"kvverify[{self.state.spec}]::{self.prop.name}"


def _require_session(request: pytest.FixtureRequest) -> _TargetSession:
    state = _session(request.config)
    if state is None:
        pytest.skip(f"no kvverify target: pass --kv-cache=MODULE:FACTORY or set {ENV_TARGET}")
    return state


@pytest.fixture(scope="session")
def kv_cache_factory(request: pytest.FixtureRequest) -> CacheFactory:
    """The factory named by ``--kv-cache`` (skips the test when none is)."""
    return _require_session(request).factory


@pytest.fixture(scope="session")
def kv_target(request: pytest.FixtureRequest) -> Target:
    """The ``--kv-cache`` target: declaration, detected optional methods, ``new_cache(config)`` (checked)."""
    return _require_session(request).target


@pytest.fixture(scope="session")
def kv_reference_model() -> Iterator[Callable[..., ReferenceModel]]:
    """``make(config, seed=0)``: the reference model for a :class:`~kvverify.ModelConfig` (memoised)."""
    from kvverify.suite.case import build_model

    def make(config: Any, seed: int = 0) -> ReferenceModel:
        return build_model(config, seed)

    yield make


@pytest.fixture(scope="session")
def kv_cases(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """:func:`kvverify.suite.strategies.cases`, bound to the target's declared constraints and device when a
    target is named."""
    import functools

    from kvverify.suite.strategies import cases

    state = _session(request.config)
    return functools.partial(cases, **state.target.config_constraints()) if state is not None else cases
