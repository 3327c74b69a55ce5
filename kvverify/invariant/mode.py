"""The batch-invariant mode: two torch modes that route a model's reductions to fixed-order kernels.

- :class:`InvariantKernels`, a ``TorchDispatchMode``, sees every aten op after autograd and the composite
  decompositions and replaces the reductions of :data:`~kvverify.invariant.aten.KERNELS` (matmuls, softmax,
  sums and means, the norms) and the transcendental elementwise ops (lane-aligned on the CPU). Under
  ``torch.inference_mode`` composite ops arrive undecomposed (``softmax.int``, ``matmul``, ``layer_norm``):
  the mode decomposes them with itself re-entered, so their parts reach it too.
- :class:`InvariantAttention`, a ``TorchFunctionMode``, sends ``F.scaled_dot_product_attention`` to
  :func:`~kvverify.invariant.attention.attention` before torch picks a fused kernel, on every device.

Both run Python kernels made of elementwise ops, so another dispatch mode entered *outside* this one (an
:class:`~kvverify.invariant.audit.OrderAudit`) sees the ops that actually run, not the ones they replace::

    with OrderAudit() as audit, batch_invariant():
        model(tokens)
    assert not audit.violations, audit.report()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode_temporarily

from kvverify.invariant import aten
from kvverify.invariant.attention import attention
from kvverify.invariant.audit import bind  # the op's arguments by schema name, as the audit reads them
from kvverify.invariant.pointwise import is_transcendental, lane_stable_op


@functools.cache
def _composite(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` is a composite of other aten ops (it reaches a dispatch mode whole only under
    inference_mode)."""
    name = func.name()  # type: ignore[no-untyped-call]
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd"))


class InvariantKernels(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves the mode untyped
    """Replaces the aten reductions and transcendental ops with batch-invariant kernels (see the module)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.replaced = 0  # calls that ran one of the mode's kernels

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if aten.applies(func, args):
            self.replaced += 1
            return aten.KERNELS[func](bind(func, args, kwargs))
        if is_transcendental(func):
            return lane_stable_op(func, args, kwargs)
        if _composite(func):
            with self:  # under inference_mode composite ops (softmax.int, matmul, layer_norm) arrive whole
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func._schema.name.partition("::")[2] in aten.FUSED_ATTENTION:
            raise NotImplementedError(
                f"{func} reached the batch-invariant mode, which does not replace fused attention kernels; "
                "call F.scaled_dot_product_attention inside batch_invariant() (the mode decomposes it) "
                "rather than the fused kernel itself"
            )
        return func(*args, **kwargs)


class InvariantAttention(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` to the mode's decomposition; every other call passes.

    The decomposition calls the kernels itself, so while it runs, ``kernels`` (when it is the innermost dispatch
    mode) steps aside: its elementwise ops then reach the modes outside it (an audit) without a detour."""

    def __init__(self, kernels: InvariantKernels | None = None) -> None:
        super().__init__()
        self.kernels = kernels

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if self.kernels is not None and _get_current_dispatch_mode() is self.kernels:
            with _pop_mode_temporarily():
                return attention(*args, **kwargs)[0]
        return attention(*args, **kwargs)[0]


@contextmanager
def batch_invariant() -> Iterator[InvariantKernels]:
    """Within the block, every row of a PyTorch model gets the same bits whatever the other rows, the batch
    size, and exact zeros (masked keys) before, between or after its keys, on the CPU and on CUDA.

    Replaced: ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``mv``, ``addmv``, ``dot``, ``linear``; ``_softmax``,
    ``_safe_softmax``, ``_log_softmax``, ``logsumexp``; ``sum`` and ``mean``; ``native_layer_norm`` and
    ``_fused_rms_norm``; ``F.scaled_dot_product_attention`` (and its aten op and CPU flash kernel); transcendental
    elementwise ops on the CPU. Every sum runs left to right (:mod:`kvverify.invariant.ordered`). Yields the
    dispatch mode, whose ``replaced`` counts the calls its kernels ran. Enter an ``OrderAudit`` outside it.
    """
    kernels = InvariantKernels()
    with InvariantAttention(kernels), kernels:
        yield kernels
