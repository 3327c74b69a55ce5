"""Known upstream failures: bugs of other libraries' caches that kvverify finds, reported as expected failures.

A :class:`KnownFailure` names the library and the versions it is known in, the cache as kvverify's tables name
it, the checks it fails (properties such as ``crop``, or ``verify-hf:MODEL``), a pattern the failure's report
matches, the upstream issue where there is one, and a **fixed reproducing example** (``reproduce``): a few lines
that call the library directly and return what went wrong, or None when it behaved.

Two rules keep the registry honest:

- a failure is expected (XFAIL) only when its entry applies to the installed version, its pattern matches the
  report, and its fixed example still reproduces: a different failure of the same cache stays unexpected;
- every entry's fixed example is rerun on every run, whatever examples the search drew, and one that passes is
  reported as XPASS (fixed upstream: narrow the entry's versions or remove it), which, like an unexpected
  failure, fails the run.

The entries live beside each library's adapter (:mod:`kvverify.adapters.hf.known` for transformers) and are
collected in :data:`kvverify.adapters.known.KNOWN_FAILURES`.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

Status = Literal["reproduced", "fixed", "not installed", "other version", "error"]


@dataclass(frozen=True)
class KnownFailure:
    """One upstream bug, as kvverify meets it.

    versions: (first affected, first fixed), each a release such as ``"5.0"``; the second None when no fixed
    release is known. issue: the upstream issue or pull request that reports this bug; related: one that
    reports the same class of bug elsewhere (when no issue for this one was found).
    """

    name: str  # short id, e.g. "transformers-static-overcrop"
    library: str  # the distribution, as importlib.metadata names it
    versions: tuple[str, str | None]
    cache: str  # as the tables name it: "transformers-static", "offloaded-static"
    checks: tuple[str, ...]  # the properties (or "verify-hf:MODEL") it fails
    pattern: str  # a regular expression the failure's report matches
    summary: str  # one line: what goes wrong
    reproduce: Callable[[], str | None]  # the fixed example: what went wrong, or None when it behaved
    issue: str | None = None
    related: str | None = None

    @property
    def reference(self) -> str:
        """The issue to cite, as the tables print it."""
        if self.issue:
            return self.issue
        if self.related:
            return f"no issue found; related: {self.related}"
        return "no upstream issue found"


@dataclass(frozen=True)
class Reproduction:
    """What a known failure's fixed example did on this machine."""

    entry: KnownFailure
    status: Status
    version: str | None
    detail: str  # what went wrong ("reproduced"), or why it did not run

    @property
    def verdict(self) -> str:
        """XFAIL (reproduced, as expected), XPASS (fixed: remove the entry), skip (not checkable here), ERROR."""
        return {"reproduced": "XFAIL", "fixed": "XPASS", "error": "ERROR"}.get(self.status, "skip")

    @property
    def unexpected(self) -> bool:
        """The fixed example passed (fixed upstream) or broke differently: the run fails."""
        return self.status in ("fixed", "error")


def release(version: str) -> tuple[int, ...]:
    """``"5.24.0"`` -> (5, 24, 0); ``"0.6.1+cpu"`` -> (0, 6, 1); pre-release tags end the number."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(numbers)


def installed_version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(version: str, versions: tuple[str, str | None]) -> bool:
    first, fixed = versions
    return release(first) <= release(version) and (fixed is None or release(version) < release(fixed))


def reproduce(entry: KnownFailure) -> Reproduction:
    """Run the entry's fixed example, where its library is installed at an affected version."""
    version = installed_version(entry.library)
    if version is None:
        return Reproduction(entry, "not installed", None, f"{entry.library} is not installed")
    if not in_range(version, entry.versions):
        first, fixed = entry.versions
        return Reproduction(entry, "other version", version,
                            f"{entry.library} {version} is outside the affected range {first} to {fixed or 'now'}")
    try:
        what = entry.reproduce()
    except Exception as error:  # the example itself broke in a way the entry does not describe
        return Reproduction(entry, "error", version, f"the fixed example raised {type(error).__name__}: {error}")
    if what is None:
        return Reproduction(entry, "fixed", version,
                            f"the fixed example passes on {entry.library} {version}: fixed upstream? narrow the "
                            f"entry's versions to before {version} or remove it")
    return Reproduction(entry, "reproduced", version, what)


class KnownFailures:
    """A registry with each entry's fixed example run once, on first use."""

    def __init__(self, entries: Iterable[KnownFailure]) -> None:
        self.entries = tuple(entries)
        self._reproductions: dict[str, Reproduction] = {}

    def only(self, caches: Iterable[str]) -> KnownFailures:
        """A fresh registry of the entries of these caches (a run of some libraries judges only theirs)."""
        wanted = set(caches)
        return KnownFailures(entry for entry in self.entries if entry.cache in wanted)

    def reproductions(self) -> list[Reproduction]:
        """Every entry's fixed example, run (once per registry)."""
        for entry in self.entries:
            if entry.name not in self._reproductions:
                self._reproductions[entry.name] = reproduce(entry)
        return [self._reproductions[entry.name] for entry in self.entries]

    def match(self, cache: str, check: str, report: str) -> KnownFailure | None:
        """The entry that explains a failure of ``check`` on ``cache`` with this report: it names both, its
        pattern matches the report, and its fixed example reproduces here. None: the failure is unexpected."""
        for reproduction in self.reproductions():
            entry = reproduction.entry
            if (entry.cache == cache and check in entry.checks and reproduction.status == "reproduced"
                    and re.search(entry.pattern, report)):
                return entry
        return None
