"""``--database``: a failure one run finds is the first example of the next run, whatever its seed, in a directory
or a Redis server (fakeredis serving on a loopback port here, reached by the real redis client), keyed by
target; without a database the next seed does not find it; a database that cannot be used is a usage error
(exit 2) saying what was expected."""

from __future__ import annotations

import re
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis.core as hypothesis_core
import pytest
from hypothesis.database import DirectoryBasedExampleDatabase, MultiplexedDatabase

from kvverify.cli import main
from kvverify.runs import CacheCheckFailed, SuiteResult, check_cache, run_suite
from kvverify.runs.database import DatabaseError, describe_database, example_key, open_database

fakeredis = pytest.importorskip("fakeredis")
redis = pytest.importorskip("redis")
from hypothesis.extra.redis import RedisExampleDatabase  # noqa: E402  (needs redis)

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
TARGET = "targets.buggy:rare_length"  # wrong only on an append of exactly 13 tokens at once
MISSES = 2  # a seed that does not find the bug within BUDGET (test_without_a_database_the_other_seed_misses_the_bug)
#: Seeds tried in turn for the run that finds the bug, each with FIND_BUDGET examples. Which examples a seed draws
#: moves with pytest's --hypothesis-seed (once a database is given) and with Hypothesis' releases: the first seed
#: that finds the bug is the finding run, so the tests below hold under any of them.
FINDING_SEEDS = list(range(3, 16))  # MISSES is not among them
FIND_BUDGET = 200
BUDGET = dict(profile="dev", max_examples=10, properties=["cached_equals_uncached"], time_limit=None)
QUICK = ["--profile", "dev", "--max-examples", "10", "--property", "cached_equals_uncached"]
REDIS_URL = "redis://127.0.0.1:6379/0"  # only for the error cases: nothing connects to it


@dataclass(frozen=True)
class Found:
    """The run that found the bug, and the databases it saved its failure in."""

    result: SuiteResult
    directory: Path
    redis_url: str  # a fakeredis server on a loopback port


def _rare_length() -> object:
    sys.path.insert(0, str(TESTS))
    try:
        from targets.buggy import rare_length
    finally:
        sys.path.remove(str(TESTS))
    return rare_length


@pytest.fixture(autouse=True, scope="module")
def _unforced() -> Iterator[None]:
    """pytest's --hypothesis-seed (which .ci/run passes) forces one seed on every test in the process, and a forced
    seed turns Hypothesis' example database off: the module runs without it, as kvverify's users' runs do."""
    forced = hypothesis_core.global_force_seed
    hypothesis_core.global_force_seed = None
    yield
    hypothesis_core.global_force_seed = forced


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Found]:
    """The first of FINDING_SEEDS that finds the bug, and saves it in a directory and a Redis server at once
    (run_suite takes any Hypothesis database: here both, multiplexed)."""
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0))
    server.daemon_threads = True  # a connection left open must not keep the interpreter alive
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = fakeredis.FakeRedis(server=server.fake_server)
    try:
        verdicts = []
        for seed in FINDING_SEEDS:
            client.flushall()  # each try starts from empty databases
            directory = tmp_path_factory.mktemp(f"examples-seed-{seed}")
            both = MultiplexedDatabase(DirectoryBasedExampleDatabase(directory), RedisExampleDatabase(client))
            result = run_suite(_rare_length(), target=TARGET, seed=seed, database=both,  # type: ignore[arg-type]
                               **{**BUDGET, "max_examples": FIND_BUDGET})  # type: ignore[arg-type]
            first = result.results[0]
            verdicts.append(f"seed {seed}: {first.verdict} after {first.examples} examples")
            if first.verdict == "failed" and first.examples > 0:  # found by search, not on its first example
                yield Found(result, directory, f"redis://127.0.0.1:{server.server_address[1]}/0")
                return
        pytest.fail(f"no seed of {FINDING_SEEDS} found the 13-token bug within {FIND_BUDGET} examples: "
                    + "; ".join(verdicts))
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def _row(out: str) -> tuple[int, str]:
    match = re.search(r"cached_equals_uncached\s+(\d+)\s+(PASS|FAIL)", out)
    assert match is not None, out
    return int(match.group(1)), match.group(2)


def _minimal_case(detail: str) -> str:
    return detail[detail.index("minimal case:"):].split("\n\n")[0]


def test_without_a_database_the_other_seed_misses_the_bug() -> None:
    result = run_suite(_rare_length(), target=TARGET, seed=MISSES, **BUDGET)  # type: ignore[arg-type]
    assert result.results[0].verdict == "passed" and result.results[0].examples == 10, result.results[0]


@pytest.mark.usefixtures("_targets_importable")
def test_verify_replays_the_saved_failure_first_with_another_seed(found: Found,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Through the child process verify runs the target in: the option reaches it, and the key matches."""
    assert main(["verify", TARGET, *QUICK, "--seed", str(MISSES), "--database", str(found.directory)]) == 1
    out = capsys.readouterr().out
    assert _row(out) == (0, "FAIL")  # the first example fails: the saved one, not the seed's
    assert f"database {found.directory}" in out.splitlines()[0]
    assert _minimal_case(out) == _minimal_case(found.result.results[0].detail)
    reproduce = re.search(r"^reproduce: kvverify verify (.*)$", out, re.M)
    assert reproduce is not None and f"--database {found.directory}" in reproduce.group(1), out


def test_a_redis_database_round_trips_and_replays_the_saved_failure_first(found: Found) -> None:
    database = open_database(found.redis_url)
    assert isinstance(database, RedisExampleDatabase)
    database.save(b"round-trip", b"\x00\x01")
    assert list(database.fetch(b"round-trip")) == [b"\x00\x01"]
    database.delete(b"round-trip", b"\x00\x01")
    assert list(database.fetch(b"round-trip")) == []
    with pytest.raises(CacheCheckFailed) as failed:
        check_cache(_rare_length(), name=TARGET, seed=MISSES, database=found.redis_url,  # type: ignore[arg-type]
                    **BUDGET)  # type: ignore[arg-type]
    result = failed.value.result.results[0]
    assert result.examples == 0, result
    assert _minimal_case(result.detail) == _minimal_case(found.result.results[0].detail)


@pytest.mark.usefixtures("_targets_importable")
def test_verify_reaches_the_redis_server_from_its_child_process(found: Found,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", TARGET, *QUICK, "--seed", str(MISSES), "--database", found.redis_url]) == 1
    assert _row(capsys.readouterr().out) == (0, "FAIL")


def test_saved_failures_are_kept_apart_by_target(found: Found) -> None:
    """The same cache under another name does not get the failure replayed: keys separate targets."""
    result = run_suite(_rare_length(), target="another-name", seed=MISSES,  # type: ignore[arg-type]
                       database=str(found.directory), **BUDGET)  # type: ignore[arg-type]
    assert result.results[0].verdict == "passed" and result.results[0].examples == 10, result.results[0]


def test_keys_differ_in_each_of_target_property_shapes_and_device() -> None:
    base = ("t", "p", "default", "cpu")
    keys = {example_key(*base)}
    for i, other in enumerate(("u", "q", "production", "cuda:0")):
        keys.add(example_key(*(other if j == i else part for j, part in enumerate(base))))
    assert len(keys) == 5


def test_a_missing_redis_client_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(DatabaseError, match=r"pip install 'kvverify\[redis\]'"):
        open_database(REDIS_URL)
    assert main(["verify", "contiguous", "--database", REDIS_URL]) == 2
    assert "pip install 'kvverify[redis]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "--database must be a directory or redis://HOST:PORT[/DB]; got ''"),
        ("s3://bucket/examples", "unknown scheme 's3'; expected a directory or redis://HOST:PORT[/DB]"),
        ("FILE", "is a file; expected a directory"),
        ("redis://127.0.0.1:1/0", "the Redis server did not answer"),  # nothing listens on port 1
        ("redis://127.0.0.1:notaport/0", "is not a Redis URL"),
    ],
)
def test_a_database_that_cannot_be_used_exits_2(spec: str, expected: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if spec == "FILE":
        spec = str(tmp_path / "examples.txt")
        Path(spec).write_text("not a directory")
    assert main(["verify", "contiguous", "--database", spec]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.startswith("kvverify verify: --database"), err


def test_check_cache_rejects_a_database_of_another_type() -> None:
    with pytest.raises(DatabaseError, match="got int 3"):
        check_cache(_rare_length(), database=3)  # type: ignore[arg-type]


def test_the_pytest_plugin_replays_the_saved_failure_first(found: Found, pytester: pytest.Pytester) -> None:
    shutil.copytree(TESTS / "targets", pytester.path / "targets")
    result = pytester.runpytest(f"--kv-cache={TARGET}", "-p", "no:cacheprovider", "--kv-profile=dev",
                                "--kv-max-examples=10", f"--kv-seed={MISSES}", f"--kv-database={found.directory}",
                                "-k", "cached_equals_uncached")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"*property cached_equals_uncached failed for {TARGET} after 0 passing examples*",
        f"reproduce: pytest --kv-cache={TARGET} --kv-profile=dev --kv-seed={MISSES} --kv-max-examples=10 "
        f"--kv-database={found.directory} -k cached_equals_uncached",
    ])


def test_a_bad_kv_database_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    shutil.copytree(TESTS / "targets", pytester.path / "targets")
    result = pytester.runpytest("--kv-cache=targets.plain_cache:make_cache", "-p", "no:cacheprovider",
                                "--kv-database=s3://bucket")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: kvverify: --kv-database 's3://bucket': unknown scheme 's3'*"])


def test_a_redis_password_never_reaches_the_log() -> None:
    assert describe_database("redis://:s3cret@cache.example:6379/2") == "redis://***@cache.example:6379/2"
    assert describe_database("kv-examples") == "kv-examples"


def test_a_database_error_in_the_child_process_comes_back_as_such() -> None:
    """verify checks the database before it starts a child; one the child cannot use still reads as a usage error."""
    import argparse
    import functools

    import torch

    from kvverify.commands.verify import configure, suite_for
    from kvverify.runs.isolation import run_isolated

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["contiguous", "--property", "reset"])
    args.database = ""  # the parent would refuse it before starting the child; here the child's run_suite does
    work = functools.partial(suite_for, args, "contiguous", 0, torch.device("cpu"))
    with pytest.raises(DatabaseError, match="database must be a directory or redis://HOST:PORT"):
        run_isolated(work, target="contiguous", properties=["reset"], time_limit=None)
