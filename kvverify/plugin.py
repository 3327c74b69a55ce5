"""The pytest plugin: ``pytest --kv-cache=MODULE:FACTORY`` runs kvverify's property suite against a cache.

Registered through ``[project.entry-points.pytest11]``, so it loads in every pytest run once kvverify is
installed: this module imports only pytest at load time; torch, Hypothesis strategies and the suite are
imported once a target is named (``--kv-cache`` or the ``KVVERIFY_CACHE`` environment variable).

With a target, the session gains one test item per property of :data:`kvverify.checks.PROPERTIES`, named
``kvverify[MODULE:FACTORY]::PROPERTY`` (select with ``-k``), skipped with the reason when the cache lacks an
optional method the property needs. A failure's report is the suite's: the minimal case, where the cache
first went wrong, and the command that reproduces it.

Fixtures, for tests of your own: ``kv_cache_factory`` (the target's factory), ``kv_target`` (its
:class:`~kvverify.checks.Target`), ``kv_reference_model`` (``(config, seed=0) -> ReferenceModel``) and
``kv_cases`` (:func:`kvverify.checks.strategies.cases` bound to the target's declared constraints and device).
``--kv-device`` (or ``KVVERIFY_DEVICE``) puts the models, prompts and caches on ``cpu``, ``cuda`` or ``cuda:N``.
``--kv-database DIR|redis://HOST:PORT[/DB]`` keeps failing examples there; the next run replays them first.
``--kv-isolate`` runs each property in a child process, as ``kvverify verify`` does (its own process group, killed
whole): a cache that ends the process, crashes or swallows the time limit's interrupt fails that item, naming
the cause, and the pytest run goes on. The target is imported and probed in a child too; only the fixtures
build it in pytest's process, when a test asks for one. Without it the cache runs in pytest's process.
Markers: ``kvverify`` (on the generated items) and ``kv_needs(*methods)`` (skip unless the target has them).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hypothesis.database import ExampleDatabase

    from kvverify.checks import Property, Target
    from kvverify.protocol.cache import CacheFactory
    from kvverify.reference.model import ReferenceModel
    from kvverify.runs import PropertyResult, TargetSummary

#: The environment variable that names a target when ``--kv-cache`` is not given.
ENV_TARGET = "KVVERIFY_CACHE"
#: The environment variable that names the device when ``--kv-device`` is not given.
ENV_DEVICE = "KVVERIFY_DEVICE"
_STATE = "kvverify-target"
_SEED_KEY = "kvverify_seed"
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
    group.addoption("--kv-time-limit", default=None, metavar="SECONDS",
                    help="seconds one example may take before the cache is reported as hanging (default: 60, 300 at "
                    "--kv-shapes production; "
                    "none: no limit)")
    group.addoption("--kv-shapes", choices=("default", "production"), default="default",
                    help="default: toy models (fast); production: head_dim 64/128, GQA up to 8, bf16/fp16, "
                    "blocks of 16, contexts to 4096 (default: default)")
    group.addoption("--kv-device", metavar="DEVICE", default=None,
                    help=f"where the models, prompts and caches live: cpu, cuda or cuda:N (or set {ENV_DEVICE}; "
                    "default: cpu)")
    group.addoption("--kv-database", metavar="DIR|URL", default=None,
                    help="keep failing examples in this directory, or in redis://HOST:PORT[/DB] (kvverify[redis]); "
                    "the next run replays them first, whatever its seed (default: no database)")
    group.addoption("--kv-isolate", action="store_true", default=False,
                    help="run each property in a child process, as kvverify verify does: a cache that ends the "
                    "process, crashes or hangs fails that item (default: in pytest's process)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvverify: a property of kvverify's suite, run against the --kv-cache target")
    config.addinivalue_line(
        "markers", "kv_needs(*methods): skip unless the --kv-cache target has these optional methods "
        "(crop, reorder_cache, reset)")
    spec = config.getoption("kv_cache") or os.environ.get(ENV_TARGET) or None
    if spec is None:
        return
    try:
        config.pluginmanager.register(_TargetSession.load(config, spec), _STATE)
    except pytest.UsageError as error:
        if config.getoption("kv_cache"):
            raise  # asked for on the command line: the run itself is wrong
        # named by the environment: only the kvverify items and fixtures error; every other test still runs
        config.pluginmanager.register(_UnloadableTarget(spec, str(error)), _STATE)


def _session(config: pytest.Config) -> _TargetSession | None:
    state = config.pluginmanager.get_plugin(_STATE)
    return state if isinstance(state, _TargetSession) else None


class _TargetSession:
    """The target of this pytest run and the settings its properties run with; also a plugin (its hooks)."""

    def __init__(self, spec: str, target: Target | None, summary: TargetSummary, profile: str, seed: int,
                 max_examples: int | None, time_limit: float | None, device_option: str | None = None,
                 database: tuple[str, ExampleDatabase] | None = None, isolate: bool = False) -> None:
        self.spec, self._target, self.summary, self.device_option = spec, target, summary, device_option
        self.isolate = isolate
        self.profile, self.seed, self.max_examples, self.time_limit = profile, seed, max_examples, time_limit
        self.database_option: str | None = database[0] if database else None  # as given, for the reproduce line
        self.database: ExampleDatabase | None = database[1] if database else None

    @property
    def target(self) -> Target:
        """The target in pytest's process; under ``--kv-isolate`` built at first use (only the fixtures ask)."""
        if self._target is None:
            from kvverify.runs import describe_target

            self._target = self._loaded(lambda: describe_target(
                self.factory, self.spec, time_limit=self.time_limit, device=self.summary.device,
                shapes=self.summary.shapes))
        return self._target

    @property
    def factory(self) -> CacheFactory:
        from kvverify.checks import resolve_target

        return self._target.factory if self._target is not None else self._loaded(lambda: resolve_target(self.spec))

    def _loaded(self, load: Callable[[], Any]) -> Any:
        from kvverify.checks import TargetError

        try:
            return load()
        except TargetError as error:  # in a fixture: that test errors, saying why
            pytest.fail(f"kvverify: {error}", pytrace=False)

    @classmethod
    def load(cls, config: pytest.Config, spec: str) -> _TargetSession:
        from kvverify.checks import (
            DeviceError,
            TargetError,
            default_time_limit,
            parse_time_limit,
            resolve_device,
            resolve_target,
        )
        from kvverify.runs import DatabaseError, describe_isolated, describe_target, open_database, summarize

        max_examples = config.getoption("kv_max_examples")
        if max_examples is not None and max_examples < 1:
            raise pytest.UsageError(f"--kv-max-examples must be >= 1; got {max_examples}")
        limit = config.getoption("kv_time_limit")
        try:
            time_limit = (default_time_limit(config.getoption("kv_shapes")) if limit is None
                          else parse_time_limit(limit, "--kv-time-limit"))
        except ValueError as error:
            raise pytest.UsageError(f"kvverify: {error}") from None
        database_option = config.getoption("kv_database")
        try:
            database = None if database_option is None else (database_option, open_database(database_option))
        except DatabaseError as error:
            raise pytest.UsageError(f"kvverify: --kv-{error}") from None
        device_option = config.getoption("kv_device") or os.environ.get(ENV_DEVICE) or None
        option = "--kv-device" if config.getoption("kv_device") else ENV_DEVICE + "="
        isolate, shapes = config.getoption("kv_isolate"), config.getoption("kv_shapes")
        target = None
        try:
            device = resolve_device(device_option, option=option)
            if isolate:  # the target's code runs in a child from the start: its import and probe too
                summary = describe_isolated(spec, time_limit=time_limit, device=str(device), shapes=shapes)
            else:
                target = describe_target(resolve_target(spec), spec, time_limit=time_limit, device=device,
                                         shapes=shapes)
                summary = summarize(target)
        except (DeviceError, TargetError) as error:
            raise pytest.UsageError(f"kvverify: {error}") from None
        seed = config.getoption("kv_seed")
        if seed is None:  # an xdist worker runs the seed its controller drew (see pytest_configure_node)
            seed = getattr(config, "workerinput", {}).get(_SEED_KEY)
        return cls(spec, target, summary, config.getoption("kv_profile"),
                   random.randrange(2**32) if seed is None else seed, max_examples, time_limit, device_option,
                   database, isolate=isolate)

    @pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook, on the controller: every worker gets its seed
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[_SEED_KEY] = self.seed

    def reproduce(self, name: str) -> str:
        parts = [f"pytest --kv-cache={self.spec} --kv-profile={self.profile} --kv-seed={self.seed}"]
        if self.max_examples is not None:
            parts.append(f"--kv-max-examples={self.max_examples}")
        if self.summary.device != "cpu":
            parts.append(f"--kv-device={self.device_option}")
        if self.summary.shapes != "default":
            parts.append(f"--kv-shapes={self.summary.shapes}")
        if self.isolate:
            parts.append("--kv-isolate")
        if self.database_option is not None:  # the failure may be a replay from the database, not the seed's
            from kvverify.runs import describe_database

            parts.append(f"--kv-database={describe_database(self.database_option)}")
        return " ".join([*parts, f"-k {name}"])

    def run_isolated(self, name: str) -> PropertyResult:
        """Property ``name`` in a child process (:func:`kvverify.runs.run_isolated`), with this run's options."""
        import functools

        from kvverify.runs import run_isolated, suite_in_child

        work = functools.partial(suite_in_child, self.spec, target=self.spec, profile=self.profile, seed=self.seed,
                                 time_limit=self.time_limit, device=self.summary.device,
                                 max_examples=self.max_examples, shapes=self.summary.shapes,
                                 database=self.database_option)
        (result,) = run_isolated(work, target=self.spec, properties=[name], time_limit=self.time_limit).results
        return result

    def pytest_report_header(self, config: pytest.Config) -> str:
        capabilities = ", ".join(sorted(self.summary.capabilities)) or "none"
        return (f"kvverify: target {self.spec}, profile {self.profile}, seed {self.seed}, "
                f"device {self.summary.device}, shapes {self.summary.shapes}, optional methods: {capabilities}, "
                f"{self.summary.declaration}"
                + (", each property in a child process" if self.isolate else ""))

    @pytest.hookimpl(tryfirst=True)  # before -k and -m deselect
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        suite = _Suite.from_parent(session, name=f"kvverify[{self.spec}]", nodeid=f"kvverify[{self.spec}]")
        suite.state = self
        items.extend(session.genitems(suite))  # reported as collected, like items from files

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        for marker in item.iter_markers("kv_needs"):
            missing = sorted(set(marker.args) - self.summary.capabilities)
            if missing:
                pytest.skip(f"the cache {self.spec} has no {', '.join(f'{m}()' for m in missing)}")


class _Suite(pytest.Collector):
    """The parent of the generated items (they come from no file): one per property of the suite."""

    state: _TargetSession

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        from kvverify.checks import PROPERTIES

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
        from kvverify.runs import run_property

        state = self.state
        missing = sorted(self.prop.needs - state.summary.capabilities)
        if missing:
            pytest.skip(f"the cache {state.spec} has no {', '.join(f'{m}()' for m in missing)}")
        reason = state.summary.skips.get(self.prop.name)
        if reason is not None:
            pytest.skip(f"{state.spec}: {reason}")
        if state.isolate:
            result = state.run_isolated(self.prop.name)
        else:
            result = run_property(self.prop, state.target, profile=state.profile, seed=state.seed,
                                  time_limit=state.time_limit, max_examples=state.max_examples,
                                  database=state.database)
        if result.verdict == "skipped":
            pytest.skip(f"{state.spec}: {result.detail}")
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


class _UnloadableTarget:
    """A target named by the environment that could not be loaded: its items error with the loading message."""

    def __init__(self, spec: str, message: str) -> None:
        self.spec, self.message = spec, f"{message} (the target comes from {ENV_TARGET}={spec})"

    def pytest_report_header(self, config: pytest.Config) -> str:
        return f"kvverify: {ENV_TARGET}={self.spec} could not be loaded; its items error, other tests run"

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        suite = _UnloadableSuite.from_parent(session, name=f"kvverify[{self.spec}]", nodeid=f"kvverify[{self.spec}]")
        suite.message = self.message
        items.extend(session.genitems(suite))  # reported as collected, like the items of a loaded target


class _UnloadableSuite(pytest.Collector):
    message: str

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        from kvverify.checks import PROPERTIES

        return [_UnloadableItem.from_parent(self, name=name, message=self.message) for name in PROPERTIES]


class _UnloadableItem(pytest.Item):
    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message
        self.add_marker("kvverify")

    def setup(self) -> None:  # an error in setup: reported as an error, with the message alone
        pytest.fail(self.message, pytrace=False)

    def runtest(self) -> None:  # never reached: setup fails
        pytest.fail(self.message, pytrace=False)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.nodeid


def _require_session(request: pytest.FixtureRequest) -> _TargetSession:
    state = request.config.pluginmanager.get_plugin(_STATE)
    if isinstance(state, _UnloadableTarget):
        pytest.fail(state.message, pytrace=False)
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
    from kvverify.checks import build_model

    def make(config: Any, seed: int = 0) -> ReferenceModel:
        return build_model(config, seed)

    yield make


@pytest.fixture(scope="session")
def kv_cases(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """:func:`kvverify.checks.strategies.cases`, bound to the target's declared constraints and device when a
    target is named."""
    import functools

    from kvverify.checks import cases

    state = _session(request.config)
    return functools.partial(cases, **state.target.config_constraints()) if state is not None else cases
