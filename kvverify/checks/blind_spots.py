"""Examples a cache declined: it raised :class:`kvverify.Unsupported` for their shape.

Such an example is skipped (rejected, so Hypothesis draws another) and counted with its reason; the report
says how many were skipped and why, and a property none of whose examples ran says that rather than
"0 examples".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kvverify.protocol.cache import CacheDeclaration, Unsupported


def unsupported_in(error: BaseException) -> str | None:
    """The reason of the :class:`Unsupported` that caused ``error`` (itself, or a cause in its chain: the
    contract check wraps what ``update`` raised), or None when it is a real failure."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, Unsupported):
            return str(current) or "no reason given"
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@dataclass
class BlindSpots:
    """The examples skipped as Unsupported, per reason."""

    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, why: str) -> None:
        self.reasons[why] += 1

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        """``'head_dim 96 is not supported' (3 of 5)``: the most frequent reason; empty when none."""
        if not self.reasons:
            return ""
        why, times = self.reasons.most_common(1)[0]
        others = f", {len(self.reasons) - 1} other reason(s)" if len(self.reasons) > 1 else ""
        return f"{why!r} ({times} of {self.count}{others})"


def verdict_without_examples(blind: BlindSpots, declaration: CacheDeclaration) -> str:
    """Why a property ran no example: the cache raised Unsupported for every one, or none fits what it declares."""
    if blind.count:
        return (f"no example ran: the cache raised kvverify.Unsupported for every one drawn ({blind.count}; "
                f"{blind.summary()}). Declare the shapes it supports (CacheDeclaration) so the suite draws those.")
    return (f"no example fits what the cache declares ({declaration.describe()}); this property needs shapes "
            "outside it (e.g. batch_independence needs two or more rows).")
