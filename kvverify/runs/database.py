"""Hypothesis' example database for kvverify runs: failures found by one run are replayed first by the next.

A run without a database keeps none (every run is reproducible from its seed alone). With one, each property
of each target saves the failing examples it finds, and a later run, with any seed, replays them before it
draws new ones: a failure a nightly run found is the first example of the next CI run. Two kinds:

- ``DIR``: :class:`hypothesis.database.DirectoryBasedExampleDatabase` (one machine, or a directory that CI
  caches between runs);
- ``redis://HOST:PORT[/DB]`` (or ``rediss://`` for TLS): :class:`hypothesis.extra.redis.RedisExampleDatabase`,
  shared by a fleet of CI jobs; it needs the ``redis`` client (``pip install 'kvverify[redis]'``).

Hypothesis keys saved examples by its test function, and kvverify runs every property through one function:
:func:`example_key` tells apart each (target, property, shapes, device), so one cache's failures are never
replayed against another's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from hypothesis.database import ExampleDatabase

REDIS_SCHEMES = ("redis://", "rediss://")


class DatabaseError(ValueError):
    """A ``--database`` / ``database=`` that cannot be used; the message says what was expected instead."""


def open_database(spec: str) -> ExampleDatabase:
    """The example database ``spec`` names: a directory (created when missing) or ``redis://HOST:PORT[/DB]``.
    A Redis server is asked for a PING, so an unreachable one fails here rather than mid-run.

    Raises :class:`DatabaseError` naming what was expected for an empty spec, another URL scheme, a path that
    is a file or cannot be created, a missing ``redis`` client or a server that does not answer."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatabaseError(f"database must be a directory or redis://HOST:PORT[/DB]; got {spec!r}")
    if spec.startswith(REDIS_SCHEMES):
        return _redis_database(spec)
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        raise DatabaseError(f"database {spec!r}: unknown scheme {scheme!r}; expected a directory or "
                            "redis://HOST:PORT[/DB] (rediss:// for TLS)")
    return _directory_database(Path(spec).expanduser())


def as_database(database: str | os.PathLike[str] | ExampleDatabase | None) -> ExampleDatabase | None:
    """The database a ``database=`` argument names: a Hypothesis database as it is, a directory or Redis URL
    opened (:func:`open_database`), None for none; anything else is a :class:`DatabaseError`."""
    if database is None or isinstance(database, ExampleDatabase):
        return database
    if not isinstance(database, (str, os.PathLike)):
        raise DatabaseError(f"database must be a directory, redis://HOST:PORT[/DB] or a Hypothesis ExampleDatabase "
                            f"(None: no database); got {type(database).__name__} {database!r}")
    return open_database(os.fspath(database))


def key_examples(test: Any, target: str, prop: str, shapes: str, device: str) -> None:
    """Save a ``@given`` test's examples under :func:`example_key`: Hypothesis keys them by the test function's
    source, which is the same for every property and target kvverify runs (Hypothesis' own pytest plugin sets
    the same attribute to tell ``parametrize`` cases apart)."""
    test.hypothesis.inner_test._hypothesis_internal_add_digest = example_key(target, prop, shapes, device)


def example_key(target: str, prop: str, shapes: str, device: str) -> bytes:
    """The key a property's examples are saved under for one target, shape space and device (mixed by
    Hypothesis into its own digest of the test function)."""
    return hashlib.sha256(f"kvverify\0{target}\0{prop}\0{shapes}\0{device}".encode()).digest()


def describe_database(spec: str) -> str:
    """How a report names the database: the directory as given, or the Redis URL without its password."""
    if spec.startswith(REDIS_SCHEMES) and "@" in spec:
        scheme, rest = spec.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return spec


def _directory_database(path: Path) -> ExampleDatabase:
    from hypothesis.database import DirectoryBasedExampleDatabase

    if path.exists() and not path.is_dir():
        raise DatabaseError(f"database {str(path)!r} is a file; expected a directory to keep failing examples in "
                            "(it is created when missing), or redis://HOST:PORT[/DB]")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".kvverify-write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise DatabaseError(f"database directory {str(path)!r} cannot be written ({error.strerror or error}); "
                            "expected a writable directory: choose another path or fix the permissions") from None
    return DirectoryBasedExampleDatabase(path)


def _redis_database(url: str) -> ExampleDatabase:
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError:
        raise DatabaseError(f"database {describe_database(url)!r} needs the redis client, which is not installed: "
                            "pip install 'kvverify[redis]' (or pip install redis)") from None
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    except ValueError as error:
        raise DatabaseError(f"database {describe_database(url)!r} is not a Redis URL ({error}); expected "
                            "redis://HOST:PORT[/DB], e.g. redis://localhost:6379/0") from None
    try:
        client.ping()
    except redis.RedisError as error:
        raise DatabaseError(f"database {describe_database(url)!r}: the Redis server did not answer ({error}); "
                            "expected a reachable server: start it, or check the host, port and password") from None
    return RedisExampleDatabase(client)
