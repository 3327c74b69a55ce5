"""``--shard I/N``: N shards run every (target, property) pair of the run exactly once between them, in their
tables and JUnit files (merged with junitparser, as the README's CI matrix does); a bad spec exits 2."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import pytest
from junitparser import JUnitXml

from kvverify.caches import BUILTIN_CACHES
from kvverify.checks import PROPERTIES
from kvverify.cli import main
from kvverify.commands.verify import configure, planned_pairs, shard_pairs
from kvverify.runs.settings import PROFILE_OPT_IN, examples_for
from kvverify.runs.shards import EXAMPLE_COST, Shard, ShardError, assign, expected_cost, parse_shard

#: Every property but the one that compiles (seconds per example): the end-to-end runs stay fast.
CHEAP = [name for name in PROPERTIES if name != "compiled"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("profile", ["ci", "thorough"])
def test_the_shards_of_the_built_in_caches_run_every_pair_exactly_once(count: int, profile: str) -> None:
    everything = planned_pairs(_args("--profile", profile))
    expected = {(target, name) for target in BUILTIN_CACHES
                for name in [*PROPERTIES, *PROFILE_OPT_IN.get(profile, ())]}
    assert set(everything) == expected and len(everything) == len(expected)
    runs = Counter(pair for index in range(1, count + 1)
                   for pair in shard_pairs(_args("--profile", profile, "--shard", f"{index}/{count}")))
    assert set(runs) == expected
    assert set(runs.values()) == {1}, [pair for pair, times in runs.items() if times > 1]


def test_the_split_is_deterministic_and_balanced_by_examples() -> None:
    pairs = [(t, p) for t in "abcd" for p in ("heavy", "light1", "light2")]
    weight = {"heavy": 10.0, "light1": 1.0, "light2": 1.0}
    first = assign(pairs, 4, lambda pair: weight[pair[1]])
    assert first == assign(list(pairs), 4, lambda pair: weight[pair[1]])
    loads = Counter()
    for pair, shard in zip(pairs, first, strict=True):
        loads[shard] += weight[pair[1]]
    assert sorted(loads.values()) == [12.0, 12.0, 12.0, 12.0]  # one heavy and two light per shard


def test_pairs_weigh_what_their_examples_cost() -> None:
    assert expected_cost("ci", "cached_equals_uncached") == examples_for("ci", "cached_equals_uncached") == 200
    assert expected_cost("ci", "compiled") == examples_for("ci", "compiled") * EXAMPLE_COST["compiled"]
    assert expected_cost("thorough", "long_context") == EXAMPLE_COST["long_context"]  # one example, not 2000
    assert expected_cost("ci", "reset", max_examples=40) == examples_for("ci", "reset", max_examples=40)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("profile", ["ci", "thorough"])
def test_shards_weigh_about_the_same(count: int, profile: str) -> None:
    """Heaviest first, to the lightest shard: no shard is heavier than another by more than the heaviest pair."""
    loads = [sum(expected_cost(profile, name) for _, name in
                 shard_pairs(_args("--profile", profile, "--shard", f"{index}/{count}")))
             for index in range(1, count + 1)]
    heaviest = max(expected_cost(profile, name) for _, name in planned_pairs(_args("--profile", profile)))
    assert max(loads) - min(loads) <= heaviest, loads


@pytest.mark.parametrize("count", [2, 3])
def test_the_union_of_shards_run_end_to_end_is_every_pair_once(count: int, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The README's CI matrix in miniature: N runs of verify, one JUnit file each, merged."""
    options = ["--in-process", "--profile", "dev", "--max-examples", "1", "--seed", "3"]
    options += [argument for name in CHEAP for argument in ("--property", name)]
    merged = JUnitXml()
    for index in range(1, count + 1):
        report = tmp_path / f"shard-{index}.xml"
        assert main(["verify", *options, "--shard", f"{index}/{count}", "--junitxml", str(report)]) == 0
        out = capsys.readouterr().out
        assert f"shard {index}/{count}: " in out.splitlines()[0]
        assert re.search(rf"^\w+: CacheDeclaration\(.*\), shapes default, shard {index}/{count}$", out, re.M), out
        merged += JUnitXml.fromfile(str(report))
    ran = Counter()
    for suite in merged:
        shard = {p.name: p.value for p in suite.properties()}["shard"]
        assert re.fullmatch(rf"[1-{count}]/{count}", shard), shard
        ran.update((suite.name, case.name) for case in suite)
    assert set(ran) == {(target, name) for target in BUILTIN_CACHES for name in CHEAP}
    assert set(ran.values()) == {1}


@pytest.mark.parametrize("spec", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2", "1/2/3", ""])
def test_a_bad_shard_exits_2_saying_what_is_expected(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "contiguous", f"--shard={spec}"]) == 2
    err = capsys.readouterr().err
    assert "--shard expects I/N with 1 <= I <= N" in err and "got" in err, err
    with pytest.raises(ShardError):
        parse_shard(spec)


def test_a_shard_with_no_pairs_runs_nothing_and_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "empty.xml"
    assert main(["verify", "contiguous", "--property", "reset", "--shard", "2/2", "--junitxml", str(report)]) == 0
    assert "shard 2/2: 0 of 1 (target, property) pairs" in capsys.readouterr().out
    assert JUnitXml.fromfile(str(report)).tests == 0
    assert str(Shard(2, 2)) == "2/2"
