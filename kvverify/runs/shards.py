"""Splitting a run's (target, property) pairs over N CI jobs: ``--shard I/N`` runs shard I of N.

The split is a function of the pairs, their weights and N alone, so N jobs given the same target, profile,
``--max-examples`` and ``--property`` options run every pair exactly once between them. Each pair weighs what
its examples are expected to cost (:func:`expected_cost`); the heaviest go first, each to the shard with the
least weight so far (ties: the lower shard), so the shards take about the same time. The weights cannot know
which targets skip a property (``compiled`` runs only for caches that declare ``compile=True``): the shard
that gets such a pair is lighter than planned.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: One unit of work: (target, property).
Pair = tuple[str, str]

#: What one example of a property costs, in examples of ``cached_equals_uncached`` (1 when absent). From
#: ``kvverify verify --profile dev --seed 7 --shard I/4`` (I = 1..4) and ``kvverify verify contiguous --property
#: long_context --property cached_equals_uncached --profile dev --seed 7 --in-process`` on 2 shared cores: an
#: example of cached_equals_uncached took 0.05-0.06 s, of compiled (static) 3.2 s (a compilation each), of
#: long_context 52 s (one strict 2,176-token generation).
EXAMPLE_COST: dict[str, float] = {"compiled": 50.0, "long_context": 1000.0}

#: Properties whose strategy has fewer values than any profile's count: Hypothesis runs them this many times.
EXAMPLES_AT_MOST: dict[str, int] = {"long_context": 1}

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class ShardError(ValueError):
    """A ``--shard`` that is not ``I/N`` with 1 <= I <= N; the message says so."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ShardError(f"--shard expects I/N with 1 <= I <= N (shard I of N CI jobs, e.g. 2/4); "
                             f"got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def pick(self, pairs: Sequence[Pair], weight: Callable[[Pair], float] = lambda pair: 1.0) -> list[Pair]:
        """This shard's pairs, in the order given (see :func:`assign`)."""
        return [pair for pair, shard in zip(pairs, assign(pairs, self.count, weight), strict=True)
                if shard == self.index]


def expected_cost(profile: str, prop: str, *, max_examples: int | None = None) -> float:
    """What a property is expected to cost in a profile, in examples of ``cached_equals_uncached``: its count of
    examples (:func:`~kvverify.runs.settings.examples_for`) times what one costs (:data:`EXAMPLE_COST`)."""
    from kvverify.runs.settings import examples_for

    examples = min(examples_for(profile, prop, max_examples=max_examples), EXAMPLES_AT_MOST.get(prop, 1 << 62))
    return examples * EXAMPLE_COST.get(prop, 1.0)


def parse_shard(spec: str) -> Shard:
    """``"I/N"`` as a :class:`Shard`, or :class:`ShardError` saying what was expected."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ShardError(f"--shard expects I/N with 1 <= I <= N (shard I of N CI jobs, e.g. 2/4); got {spec!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def assign(pairs: Sequence[Pair], count: int, weight: Callable[[Pair], float] = lambda pair: 1.0) -> list[int]:
    """The shard (1..count) of each pair: heaviest first (ties: in the order given), each to the lightest shard
    so far (ties: the lowest). Deterministic; every pair gets exactly one shard."""
    if count < 1:
        raise ShardError(f"the number of shards must be >= 1; got {count}")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"pairs must be distinct to be split over shards; got {list(pairs)}")
    load = [0.0] * count
    shards = [0] * len(pairs)
    for position in sorted(range(len(pairs)), key=lambda i: (-weight(pairs[i]), i)):
        lightest = min(range(count), key=lambda s: (load[s], s))
        load[lightest] += weight(pairs[position])
        shards[position] = lightest + 1
    return shards
