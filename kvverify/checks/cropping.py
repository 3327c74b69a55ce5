"""What a cache's ``crop(argument)`` means, and the crops the suite asks for in that language.

kvverify's protocol uses the meaning ``crop`` had in transformers 4: ``crop(max_length)`` keeps the first
``max_length`` tokens and ``crop(-k)`` drops ``k`` from the end (clamped at zero). transformers 5 redefined
the argument as a count to remove, written as a non-positive number: ``crop(0)`` removes nothing and a
positive argument is refused. Both agree on ``crop(-k)`` with ``k`` at most the length; they disagree on
``crop(0)`` and on positive arguments.

A cache says which it speaks with ``CacheDeclaration(crop_argument="keep" | "remove")``; undeclared,
transformers' own cache objects (version 5 and later) speak ``"remove"`` and everything else ``"keep"``.
The suite decides how many tokens to keep and :func:`crop_argument` writes that in the cache's language,
so the same property checks both kinds.
"""

from __future__ import annotations

import sys
from typing import Literal

from kvverify.protocol.cache import declaration_of, resolve_crop

CropConvention = Literal["keep", "remove"]

#: Exceptions with which a cache may refuse a crop it cannot do (a ring that already evicted the tokens it
#: would need again). A refusal must leave the cache as it was; the properties check that it did.
CROP_REFUSALS: tuple[type[Exception], ...] = (ValueError, RuntimeError, NotImplementedError)


def _unwrapped(cache: object) -> object:
    while hasattr(cache, "inner"):
        cache = cache.inner
    return cache


def crop_convention(cache: object) -> CropConvention:
    inner = _unwrapped(cache)
    declared = declaration_of(inner).crop_argument
    if declared is not None:
        return declared
    if type(inner).__module__.startswith("transformers."):  # its class was imported, so transformers was too
        version = str(getattr(sys.modules.get("transformers"), "__version__", "0"))
        if int(version.split(".")[0]) >= 5:
            return "remove"
    return "keep"


def tokens_kept(convention: CropConvention, argument: int, length: int) -> int:
    """Tokens a correct cache holding ``length`` keeps after ``crop(argument)``."""
    if convention == "keep" or argument < 0:
        return resolve_crop(argument, length)
    if argument == 0:
        return length
    raise ValueError(f"crop({argument}): a cache whose argument counts tokens to remove takes no positive value")


def crop_argument(convention: CropConvention, keep_argument: int, length: int) -> int:
    """The argument that asks a cache of ``convention`` for what ``crop(keep_argument)`` means in the protocol.

    Negative arguments mean the same in both languages and pass through unchanged.
    """
    if convention == "keep" or keep_argument < 0:
        return keep_argument
    return resolve_crop(keep_argument, length) - length
