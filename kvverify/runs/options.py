"""The checks on a run's options that every way in shares (``run_suite``, ``check_cache``, ``kvverify verify``)."""

from __future__ import annotations

from collections.abc import Sequence

from kvverify.checks.properties import ALL_PROPERTIES, PROPERTIES
from kvverify.checks.watchdog import check_time_limit
from kvverify.runs.settings import PROFILE_EXAMPLES, PROFILE_OPT_IN


def check_options(*, profile: str, properties: Sequence[str] | str | None, time_limit: object,
                  max_examples: int | None) -> list[str]:
    """The property names to run (a single name is one property), or ValueError naming what was expected."""
    if profile not in PROFILE_EXAMPLES:
        raise ValueError(f"profile must be one of {', '.join(PROFILE_EXAMPLES)}; got {profile!r}.")
    check_time_limit(time_limit, "time_limit")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a whole number >= 1 (None: the profile's count); got {max_examples!r}.")
    every = [*PROPERTIES, *PROFILE_OPT_IN.get(profile, ())]  # the profile's own: thorough adds long_context
    chosen = [properties] if isinstance(properties, str) else list(every if properties is None else properties)
    unknown = [name for name in chosen if name not in ALL_PROPERTIES]
    if unknown or not chosen:
        raise ValueError(f"properties must name some of {', '.join(ALL_PROPERTIES)} (a name or a list of names; None "
                         f"for all); got {properties!r}" + (f", where {unknown} are unknown." if unknown else "."))
    return chosen
