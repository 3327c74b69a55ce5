"""Factories that cannot give the suite a cache: each answered with one TargetError paragraph, exit 2."""

from __future__ import annotations

from typing import Any

from targets.plain_cache import PlainCache

NOT_CALLABLE = 42
SHARED = PlainCache()


def raises(config: Any) -> Any:
    raise RuntimeError("no GPU found")


def returns_none(config: Any) -> None:
    PlainCache()


def returns_no_update(config: Any) -> object:
    return ["keys", "values"]


def returns_shared(config: Any) -> PlainCache:
    return SHARED


def hangs(config: Any) -> PlainCache:
    import time

    time.sleep(3600)
    return PlainCache()
