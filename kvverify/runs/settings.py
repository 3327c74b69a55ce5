"""Hypothesis settings profiles: ``ci`` (bounded time, used by CI), ``dev`` (quick) and ``thorough`` (nightly)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import ExampleDatabase

#: The environment variable that puts Hypothesis' own files (its cache of constants, temporary files)
#: somewhere else than :func:`storage_directory`'s default.
ENV_HYPOTHESIS_DIR = "KVVERIFY_HYPOTHESIS_DIR"

#: Examples per property and target in each profile (read-only: ``max_examples`` arguments change a run's count).
PROFILE_EXAMPLES: Mapping[str, int] = MappingProxyType({"dev": 50, "ci": 200, "thorough": 2000})

#: Share of the profile's examples each property runs (1 when absent). The properties after
#: cached_equals_uncached cost 1 to 3 of its examples each and target narrower bug classes, so the ci profile
#: of the whole suite stays within its budget.
PROPERTY_SHARE: Mapping[str, float] = MappingProxyType({
    "continuation": 0.15,
    "chunked_prefill": 0.15,
    "sliding_window": 0.15,
    "batch_independence": 0.15,
    "crop": 0.2,
    "reorder": 0.3,
    "reset": 0.15,
    "stateful": 0.25,
    "compiled": 0.05,  # each example compiles the decode step (seconds): 10 at ci, 100 at thorough
})


#: Opt-in properties a profile runs without being named (``--property``): the nightly profile goes past 2048 tokens.
PROFILE_OPT_IN: Mapping[str, tuple[str, ...]] = MappingProxyType({"thorough": ("long_context",)})


def examples_for(profile: str, prop: str | None = None, *, max_examples: int | None = None) -> int:
    """Examples of one property in a profile (the profile's count when ``prop`` is None): its share of the
    profile's count, at least 10 (or the profile's count, when that is smaller). ``max_examples`` replaces the
    profile's count (None: the profile's own)."""
    examples = PROFILE_EXAMPLES[profile] if max_examples is None else max_examples
    if prop is None:
        return examples
    return max(min(10, examples), round(examples * PROPERTY_SHARE.get(prop, 1.0)))

#: Properties whose examples cost seconds each (a compilation) and fail alike on any case: their first failing
#: case is reported as found, not shrunk (shrinking would compile hundreds of times).
UNSHRUNK = frozenset({"compiled"})

_PHASES = [Phase.explicit, Phase.generate, Phase.target, Phase.shrink, Phase.explain]
_COMMON = dict(
    deadline=None,  # per-example time limits are enforced by kvverify's own watchdog, not by Hypothesis
    database=None,  # no example database unless asked for: every run is reproducible from its seed alone
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    phases=_PHASES,
    report_multiple_bugs=False,
)
_UNSHRUNK_PHASES = [Phase.explicit, Phase.generate, Phase.target, Phase.explain]


def register_profiles() -> None:
    """Register the kvverify profiles with Hypothesis (idempotent)."""
    for name, examples in PROFILE_EXAMPLES.items():
        settings.register_profile(f"kvverify-{name}", max_examples=examples, **_COMMON)  # type: ignore[arg-type]


def profile_settings(name: str, prop: str | None = None, *, max_examples: int | None = None,
                     database: ExampleDatabase | None = None) -> settings:
    """The settings of one profile (for one property when ``prop`` names it: see :data:`PROPERTY_SHARE`), with
    ``max_examples`` in place of the profile's count when given; raises ValueError naming the profiles for an
    unknown name. ``database``: where failing examples are saved, and replayed first (Hypothesis' reuse
    phase) by the next run; None keeps none (:mod:`kvverify.runs.database`)."""
    if name not in PROFILE_EXAMPLES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILE_EXAMPLES)}")
    phases = _UNSHRUNK_PHASES if prop in UNSHRUNK else _PHASES
    common: dict[str, Any] = dict(_COMMON, phases=phases)
    if database is not None:  # replayed first: the reuse phase runs before any example is drawn
        common.update(database=database, phases=[Phase.reuse, *phases])
    return settings(settings.get_profile(f"kvverify-{name}") if _registered() else None,
                    max_examples=examples_for(name, prop, max_examples=max_examples), **common)


def _registered() -> bool:
    try:
        settings.get_profile("kvverify-ci")
    except Exception:
        return False
    return True


def storage_directory() -> Path:
    """Where kvverify's runs keep Hypothesis' files: ``$KVVERIFY_HYPOTHESIS_DIR``, else
    ``$XDG_CACHE_HOME/kvverify/hypothesis`` (``~/.cache/kvverify/hypothesis``). Never the working directory:
    Hypothesis' default, ``./.hypothesis``, would litter wherever ``kvverify verify`` runs."""
    chosen = os.environ.get(ENV_HYPOTHESIS_DIR)
    if chosen:
        return Path(chosen).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "kvverify" / "hypothesis"


def use_storage_directory() -> Path | None:
    """Point Hypothesis at :func:`storage_directory` (None, and nothing changed, when the user chose with
    Hypothesis' own ``HYPOTHESIS_STORAGE_DIRECTORY``). No example database is kept there either way: a run keeps
    one only where it is given one (``--database``)."""
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        return None
    path = storage_directory()
    set_hypothesis_home_dir(path)
    return path
