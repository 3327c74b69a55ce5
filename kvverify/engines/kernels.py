"""The batch-invariant kernels the engine and its oracle run under: the one place that chooses them.

Bitwise comparison of a request packed beside others against the same request alone needs kernels whose result
for a row cannot depend on the other rows or on masked keys. Until ``kvverify.invariant.batch_invariant()``
lands, that is :func:`kvverify.adapters.hf.kernels.batch_invariant_cpu` (fixed-order CPU kernels, M·K·N memory:
tiny models only). Switching to another context manager is a change of the import below and nothing else.
"""

from __future__ import annotations

from kvverify.adapters.hf.kernels import batch_invariant_cpu as invariant_kernels

__all__ = ["invariant_kernels"]
