"""The pytest plugin, run with pytester: the suite against --kv-cache, one item per property, fixtures,
markers, bad targets as usage errors, and no torch import when no target is named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from kvverify.checks import PROPERTIES

pytest_plugins = ["pytester"]

TARGETS = Path(__file__).parent / "targets"
QUICK = ["-p", "no:cacheprovider", "--kv-profile=dev", "--kv-max-examples=5", "--kv-seed=2"]


@pytest.fixture
def here(pytester: pytest.Pytester) -> pytest.Pytester:
    """A fresh directory holding only the target modules: the plugin comes from the installed package."""
    shutil.copytree(TARGETS, pytester.path / "targets")
    return pytester


def test_the_plugin_is_registered_as_an_entry_point() -> None:
    assert "kvverify.plugin" in {e.value for e in entry_points(group="pytest11") if e.name == "kvverify"}


def test_help_shows_the_options_without_importing_torch(tmp_path: Path) -> None:
    script = "import sys, pytest; pytest.main(['--help']); print('torch imported:', 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60).stdout
    assert "kvverify: run the KV-cache property suite against a cache" in out
    assert "--kv-cache=MODULE:FACTORY" in out and "--kv-profile" in out
    assert "torch imported: False" in out


def test_a_correct_external_cache_passes_one_item_per_property(here: pytest.Pytester) -> None:
    result = here.runpytest("--kv-cache=targets.plain_cache:make_cache", *QUICK, "-k", "cached_equals or reset")
    result.assert_outcomes(passed=2, deselected=len(PROPERTIES) - 2)
    result.stdout.fnmatch_lines(["kvverify: target targets.plain_cache:make_cache, profile dev, seed 2*"])


def test_a_buggy_cache_fails_with_the_located_report(here: pytest.Pytester) -> None:
    result = here.runpytest("--kv-cache=targets.buggy:stale_value", *QUICK, "-k", "cached_equals_uncached")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*property cached_equals_uncached failed for targets.buggy:stale_value*",
        "where (first difference): layer 1, head *, position 5: cached value differs from recomputed value*",
        "reproduce: pytest --kv-cache=targets.buggy:stale_value --kv-profile=dev --kv-seed=2 "
        "--kv-max-examples=5 -k cached_equals_uncached",
    ])


def test_the_environment_names_the_target_and_missing_capabilities_skip(
    here: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    here.makepyfile(bare="""
        class Bare:
            def __init__(self):
                self.n = 0
            def update(self, k, v, layer_idx, cache_kwargs=None):
                raise AssertionError('not run')
            def get_seq_length(self, layer_idx=0):
                return 0
        def make(config):
            return Bare()
    """)
    monkeypatch.setenv("KVVERIFY_CACHE", "bare:make")
    needing = [name for name, p in PROPERTIES.items() if p.needs]
    result = here.runpytest(*QUICK, "-k", " or ".join(needing), "-rs")
    result.assert_outcomes(skipped=len(needing))
    result.stdout.fnmatch_lines(["SKIPPED*the cache bare:make has no *()"])


def test_fixtures_and_markers_for_tests_of_your_own(here: pytest.Pytester) -> None:
    here.makepyfile(test_mine="""
        import pytest
        from hypothesis import given, settings

        def test_factory(kv_cache_factory, kv_target):
            assert kv_target.name == "targets.plain_cache:make_cache"
            assert kv_target.capabilities == {"crop", "reorder_cache", "reset"}

        def test_model_and_cases(kv_reference_model, kv_cases, kv_target):
            @settings(max_examples=2, deadline=None)
            @given(case=kv_cases())
            def check(case):
                model = kv_reference_model(case.config, case.seed)
                model.generate(case.tokens(), 2, cache=kv_target.new_cache(case.config),
                               attention_mask=case.attention_mask())
            check()

        @pytest.mark.kv_needs("beam_search")
        def test_needs(kv_target):
            pass
    """)
    result = here.runpytest("--kv-cache=targets.plain_cache:make_cache", *QUICK, "test_mine.py", "-m",
                            "not kvverify", "--strict-markers")
    result.assert_outcomes(passed=2, skipped=1, deselected=len(PROPERTIES))


def test_fixtures_skip_without_a_target(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(kv_cache_factory):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no kvverify target: pass --kv-cache=MODULE:FACTORY or set KVVERIFY_CACHE*"])


def test_a_bad_target_is_a_usage_error(here: pytest.Pytester) -> None:
    result = here.runpytest("--kv-cache=targets.unusable:returns_none", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: kvverify: target 'targets.unusable:returns_none': the factory returned None*"])
