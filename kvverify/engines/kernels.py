"""The batch-invariant kernels the engine and its oracle run under: the one place that chooses them.

Bitwise comparison of a request packed beside others against the same request alone needs kernels whose result
for a row cannot depend on the other rows or on masked keys: :func:`kvverify.invariant.batch_invariant`.
"""

from __future__ import annotations

from kvverify.invariant import batch_invariant as invariant_kernels

__all__ = ["invariant_kernels"]
