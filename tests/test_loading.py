"""Bad targets before the suite runs: each answered with one TargetError paragraph naming the target, what was
expected and what came."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvverify.caches import BUILTIN_CACHES
from kvverify.checks import make_target
from kvverify.checks.loading import TargetError, load_factory, resolve_target

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def test_a_good_target_loads() -> None:
    factory = load_factory("targets.plain_cache:make_cache")
    assert callable(factory)
    assert make_target(factory, "plain").capabilities == {"crop", "reorder_cache", "reset"}


def test_one_resolver_takes_a_built_in_name_or_module_factory() -> None:
    assert resolve_target("paged") is BUILTIN_CACHES["paged"]
    assert resolve_target("targets.plain_cache:make_cache") is load_factory("targets.plain_cache:make_cache")
    with pytest.raises(TargetError, match=r"'pagd': expected a built-in cache \(contiguous, .*\) or MODULE:FACTORY"):
        resolve_target("pagd")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("targets.plain_cache", "expected MODULE:FACTORY"),
        ("targets.plain_cache:a:b", "expected MODULE:FACTORY"),
        ("targets.no_such_module:make", "could not be imported (ModuleNotFoundError"),
        ("targets.broken_import:make", "a_module_that_does_not_exist"),
        ("targets.plain_cache:make_cash", "'make_cash' is not defined in 'targets.plain_cache'"),
        ("targets.plain_cache:PlainCache.nope", "'nope' is not defined in 'targets.plain_cache:PlainCache'"),
        ("targets.unusable:NOT_CALLABLE", "is a int (42), not callable"),
    ],
)
def test_unloadable_targets_are_named_with_what_to_do(spec: str, expected: str) -> None:
    with pytest.raises(TargetError) as error:
        load_factory(spec)
    message = str(error.value)
    assert message.startswith(f"target {spec!r}: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("raises", "raised RuntimeError: no GPU found"),
        ("returns_none", "the factory returned None"),
        ("returns_no_update", "returned a list (['keys', 'values']) with no callable update or get_seq_length()"),
        ("returns_shared", "returned the same PlainCache object twice"),
    ],
)
def test_unusable_factories_are_answered(name: str, expected: str) -> None:
    factory = load_factory(f"targets.unusable:{name}")
    with pytest.raises(TargetError, match="expected") as error:
        make_target(factory, name)
    assert expected in str(error.value)


def test_a_factory_that_hangs_meets_the_time_limit() -> None:
    factory = load_factory("targets.unusable:hangs")
    with pytest.raises(TargetError, match=r"did not finish within the time limit of 0.3 s"):
        make_target(factory, "hangs", time_limit=0.3)


def test_a_method_raising_not_implemented_is_not_a_capability() -> None:
    from targets.plain_cache import PlainCache

    class NoReorder(PlainCache):
        def reorder_cache(self, beam_idx: object) -> None:
            raise NotImplementedError

    assert make_target(lambda config: NoReorder(), "x").capabilities == {"crop", "reset"}
