"""Meta-tests of the properties: they pass on correct caches and go red on a cache broken on purpose."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from kvverify.caches import BUILTIN_CACHES, ContiguousCache
from kvverify.checks import PROPERTIES, make_target
from kvverify.checks.properties.stateful import machine_for
from kvverify.mutants import MUTANTS
from kvverify.protocol.config import ModelConfig
from kvverify.reference.default_cache import ReferenceCache
from kvverify.runs import run_property
from kvverify.runs.settings import PROFILE_EXAMPLES, examples_for

pytestmark = pytest.mark.slow  # the properties run against broken caches until they go red: 80 s of CPU


def test_registry_describes_every_property() -> None:
    for name, prop in PROPERTIES.items():
        assert prop.name == name, f"{name} is registered under another name"
        assert prop.summary.endswith(".") and ":" in prop.summary, f"{name}'s summary should name bug classes"
        assert prop.needs <= {"crop", "reorder_cache", "reset"}, f"{name} needs unknown methods {prop.needs}"


def test_ci_keeps_200_examples_of_cached_equals_uncached() -> None:
    assert examples_for("ci", "cached_equals_uncached") >= 200
    assert all(examples_for(p, name) >= 10 for p in PROFILE_EXAMPLES for name in PROPERTIES)


class _NoCrop(ContiguousCache):
    """A cache without crop (the attribute is hidden)."""

    crop = None  # type: ignore[assignment]


def test_a_missing_method_skips_with_the_reason() -> None:
    result = run_property(PROPERTIES["crop"], make_target(lambda config: _NoCrop(), "no-crop"), profile="dev")
    assert result.verdict == "skipped" and "crop" in result.detail, result


#: A broken cache and the property that must go red on it (not cached_equals_uncached, which misses each).
RED: dict[str, str] = {
    "crop_zero_noop": "crop",
    "reorder_keys_only": "reorder",
    "static_reset_keeps_length": "reset",
    "window_reset_keeps_pointer": "reset",
    "static_length_from_nonzero": "batch_independence",
    "gqa_repeated_before_cache": "stateful",
    "crop_first_layer_only": "stateful",
}


@pytest.mark.parametrize("mutant", sorted(RED))
def test_property_goes_red_on_a_broken_cache(mutant: str) -> None:
    prop = PROPERTIES[RED[mutant]]
    result = run_property(prop, make_target(MUTANTS[mutant].factory, mutant), profile="dev", seed=0, max_examples=200)
    assert result.verdict == "failed", f"{prop.name} did not catch {mutant}: {result.verdict} {result.detail[:400]}"


@pytest.mark.parametrize("cache", sorted(BUILTIN_CACHES))
def test_state_machine_passes_on_builtin_caches(cache: str) -> None:
    target = make_target(BUILTIN_CACHES[cache], cache)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                         max_batch_size=4, sliding_window=6 if cache == "sliding" else None)
    with torch.no_grad():
        run_state_machine_as_test(machine_for(target, config), settings=settings(max_examples=5, deadline=None,
                                                                                 stateful_step_count=6))


def test_state_machine_catches_a_broken_crop() -> None:
    target = make_target(MUTANTS["crop_first_layer_only"].factory, "crop_first_layer_only")
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=24, max_batch_size=2)
    with pytest.raises(AssertionError, match="get_seq_length"), torch.no_grad():
        run_state_machine_as_test(  # no shrinking: finding the bug is the point here
            machine_for(target, config),
            settings=settings(max_examples=100, deadline=None, database=None, phases=[Phase.generate]),
        )


def test_list_cache_concatenates() -> None:
    cache = ReferenceCache()
    first = torch.ones(1, 1, 2, 2)
    cache.update(first, first, 0)
    keys, _ = cache.update(2 * first[:, :, :1], first[:, :, :1], 0)
    assert keys.shape == (1, 1, 3, 2) and cache.get_seq_length() == 3 and float(keys[0, 0, 2, 0]) == 2.0


def test_max_examples_is_an_argument_and_the_profiles_stay_as_they_are() -> None:
    assert examples_for("dev", "crop", max_examples=200) == 40, "crop runs its share (0.2) of max_examples"
    assert examples_for("dev", "crop") == 10 and examples_for("dev") == 50
    with pytest.raises(TypeError):
        PROFILE_EXAMPLES["dev"] = 1  # type: ignore[index]  # read-only on purpose
