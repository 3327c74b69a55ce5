"""transformers' own DynamicCache as a target, built with no arguments."""

from __future__ import annotations

from typing import Any


def make_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache()
