"""Every library's known failures, in one registry (see :mod:`kvverify.adapters.known_failures`)."""

from __future__ import annotations

from kvverify.adapters.hf.known import KNOWN as TRANSFORMERS_KNOWN
from kvverify.adapters.known_failures import KnownFailure, KnownFailures
from kvverify.adapters.kvpress_known import KNOWN as KVPRESS_KNOWN
from kvverify.adapters.litgpt_known import KNOWN as LITGPT_KNOWN

#: The known upstream failures, by library.
KNOWN_FAILURES: tuple[KnownFailure, ...] = (*TRANSFORMERS_KNOWN, *LITGPT_KNOWN, *KVPRESS_KNOWN)


def registry() -> KnownFailures:
    """A fresh registry of :data:`KNOWN_FAILURES` (each fixed example runs once per registry)."""
    return KnownFailures(KNOWN_FAILURES)
