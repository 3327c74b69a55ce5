"""Hypothesis settings profiles: ``ci`` (bounded time, used by CI), ``dev`` (quick) and ``thorough`` (nightly)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, Phase, settings

#: Examples per property and target in each profile.
PROFILE_EXAMPLES: dict[str, int] = {"dev": 50, "ci": 200, "thorough": 2000}

_COMMON = dict(
    deadline=None,  # per-example time limits are enforced by kvverify's own watchdog, not by Hypothesis
    database=None,  # no example database: every run is reproducible from its seed alone
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink, Phase.explain],
    report_multiple_bugs=False,
)


def register_profiles() -> None:
    """Register the kvverify profiles with Hypothesis (idempotent)."""
    for name, examples in PROFILE_EXAMPLES.items():
        settings.register_profile(f"kvverify-{name}", max_examples=examples, **_COMMON)  # type: ignore[arg-type]


@contextmanager
def override_examples(profile: str, examples: int | None) -> Iterator[None]:
    """Within the block, ``profile`` runs ``examples`` examples per property (None: unchanged)."""
    if examples is None:
        yield
        return
    before = PROFILE_EXAMPLES[profile]
    PROFILE_EXAMPLES[profile] = examples
    try:
        yield
    finally:
        PROFILE_EXAMPLES[profile] = before


def profile_settings(name: str) -> settings:
    """The settings of one profile; raises ValueError naming the profiles for an unknown name."""
    if name not in PROFILE_EXAMPLES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILE_EXAMPLES)}")
    return settings(settings.get_profile(f"kvverify-{name}") if _registered() else None,
                    max_examples=PROFILE_EXAMPLES[name], **_COMMON)  # type: ignore[arg-type]


def _registered() -> bool:
    try:
        settings.get_profile("kvverify-ci")
    except Exception:
        return False
    return True
