"""A batch-invariant mode for any PyTorch model, on the CPU and on CUDA: :func:`batch_invariant`.

Within it a row's result cannot depend on the other rows, the batch size, or exact zeros (masked keys) placed
before, between or after its keys: matmuls, softmax, sums, means, norms and attention sum strictly left to
right (:mod:`~kvverify.invariant.ordered`), transcendental ops run lane-aligned on the CPU. A test-time room: the
mode and the order audit beside it (:class:`~kvverify.invariant.audit.OrderAudit`) import only torch and the
strict oracle's numerics (:mod:`kvverify.reference.numerics`), whose rules they share.
"""

from kvverify.invariant.audit import OrderAudit
from kvverify.invariant.mode import InvariantAttention, InvariantKernels, batch_invariant

__all__ = ["InvariantAttention", "InvariantKernels", "OrderAudit", "batch_invariant"]
