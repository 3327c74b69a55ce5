"""Every tensor the suite makes lives on the model's device, checked on a CPU-only machine two ways:

- the strategies build every case on the target's device: drawn with a target on the ``meta`` device, every
  config says ``meta`` and the prompt and mask tensors of every case land there;
- no tensor of the suite or of the built-in caches is made on the default device by accident: while whole
  suite runs (every property, every built-in cache, a failure located), every factory call (``torch.tensor``,
  ``arange``, ``ones``...) made from ``kvverify/checks``, ``kvverify/runs`` or ``kvverify/caches`` names its device.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.overrides import TorchFunctionMode

import kvverify
from kvverify.caches import BUILTIN_CACHES, ContiguousCache
from kvverify.checks import PROPERTIES, make_target
from kvverify.checks.case import Case
from kvverify.checks.compare import GenerationMismatch
from kvverify.checks.locate import locate
from kvverify.checks.properties import check_cached_equals_uncached
from kvverify.checks.strategies import cases
from kvverify.checks.target import Target
from kvverify.mutants import MUTANTS
from kvverify.protocol.config import ModelConfig
from kvverify.runs import run_suite

META = torch.device("meta")
PACKAGE = Path(kvverify.__file__).parent
AUDITED = (PACKAGE / "suite", PACKAGE / "caches")
TORCH = Path(torch.__file__).parent

#: torch's functions that make a tensor from nothing: on the default device unless told otherwise.
FACTORIES = frozenset({
    "tensor", "as_tensor", "asarray", "arange", "range", "linspace", "logspace", "ones", "zeros", "full", "empty",
    "eye", "rand", "randn", "randint", "randperm", "tril_indices", "triu_indices", "scalar_tensor",
})


def _cases_in(plan: object, depth: int = 0) -> Iterator[Case]:
    """Every :class:`Case` a property's plan holds (plans are dataclasses holding cases)."""
    if isinstance(plan, Case):
        yield plan
    elif dataclasses.is_dataclass(plan) and not isinstance(plan, type) and depth < 3:
        for item in dataclasses.fields(plan):
            yield from _cases_in(getattr(plan, item.name), depth + 1)
    elif isinstance(plan, (tuple, list)) and depth < 3:
        for item in plan:
            yield from _cases_in(item, depth + 1)


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_every_property_draws_its_cases_on_the_targets_device(name: str) -> None:
    target = Target(f"meta:{name}", ContiguousCache.from_config, device=META)
    found: list[Case] = []

    @settings(max_examples=15, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(plan=PROPERTIES[name].strategy(target))
    def draw(plan: object) -> None:
        drawn = list(_cases_in(plan))
        assert drawn, f"{name}: found no Case in the plan {type(plan).__name__}"
        found.extend(drawn)

    draw()
    assert found
    for case in found:
        assert case.config.device == "meta", f"{name}: a config built on {case.config.device}, not meta"
        assert case.tokens().device == META and case.attention_mask().device == META


@given(case=cases(device=META))
@settings(max_examples=20, database=None, deadline=None)
def test_cases_put_prompt_and_mask_on_the_device_they_were_asked_for(case: Case) -> None:
    mask = case.attention_mask()
    assert case.config.device == "meta"
    assert case.tokens().device == META and mask.device == META
    assert mask.shape == (case.batch, case.prompt_len) and mask.dtype == torch.long


def test_a_strategy_refuses_a_device_that_is_not_one() -> None:
    from hypothesis.errors import InvalidArgument

    @given(case=cases(device="gpu"))
    def draw(case: Case) -> None:
        raise AssertionError("never drawn")

    with pytest.raises(InvalidArgument, match=r"device must be a torch.device or a name"):
        draw()


class _FactoryAudit(TorchFunctionMode):
    """Records ``file:line`` of every factory call from the audited folders that names no device."""

    def __init__(self) -> None:
        super().__init__()
        self.undeviced: set[str] = set()

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and Path(frame.f_code.co_filename).is_relative_to(TORCH):
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None:
                where = Path(frame.f_code.co_filename)
                if any(where.is_relative_to(folder) for folder in AUDITED):
                    self.undeviced.add(f"{where.relative_to(PACKAGE.parent)}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.slow  # every torch call of four caches' suites through a TorchFunctionMode: 13 s
def test_the_suite_and_the_caches_name_the_device_of_every_tensor_they_make() -> None:
    audit = _FactoryAudit()
    with audit:
        for name, factory in BUILTIN_CACHES.items():
            assert run_suite(factory, target=name, profile="dev", seed=1, time_limit=None, max_examples=2).ok
        # a failure compared and located (shrinking it would only repeat the same calls, slowly)
        mutant = make_target(MUTANTS["keys_as_values"].factory, "mutant")
        case = Case(ModelConfig(n_layers=2, max_seq_len=16), prompt=((1, 2, 3), (4, 5, 6)), pad=(0, 1),
                    max_new_tokens=3)
        with pytest.raises(GenerationMismatch):
            check_cached_equals_uncached(mutant, case)
        assert locate(check_cached_equals_uncached, mutant, case, None).startswith("where (first difference)")
    assert not audit.undeviced, (
        "tensors made on the default device (the CPU) whatever the model's device; pass device=:\n  "
        + "\n  ".join(sorted(audit.undeviced))
    )
