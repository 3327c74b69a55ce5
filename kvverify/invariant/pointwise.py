"""Transcendental elementwise ops, evaluated lane-aligned on the CPU.

On the CPU these kernels run SIMD code over full vector chunks and scalar code over a tensor's tail, and the two
can differ in the last bit (measured here: silu, sigmoid, softplus and both gelus), so an element's bits would
depend on where it sits, that is on the batch around it. The mode runs each through the oracle's
:func:`~kvverify.reference.numerics.lane_stable` (CUDA kernels give an element the same bits at any offset, and
lane_stable calls them directly). Correctly rounded ops (add, mul, div, sqrt, casts) need nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvverify.reference.numerics import lane_stable

#: aten ops (out-of-place and in-place overload packets by name) whose first argument is evaluated lane-stably.
TRANSCENDENTAL: frozenset[str] = frozenset((
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh", "sinh", "cosh",
    "asin", "acos", "atan", "asinh", "acosh", "atanh", "sigmoid", "silu", "gelu", "erf", "erfc", "erfinv",
    "rsqrt", "softplus", "elu", "celu", "selu", "mish", "logit", "pow",
))


def lane_stable_op(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Any:
    """``func(*args, **kwargs)`` with the first argument evaluated lane-aligned (an in-place op writes back)."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.device.type != "cpu" or x.numel() == 0:
        return func(*args, **kwargs)
    rest = tuple(args[1:])
    if func._schema.name.endswith("_"):  # in place: compute out of place, then write into x
        out_of_place = _out_of_place(func)
        return x.copy_(lane_stable(lambda piece: out_of_place(piece, *rest, **kwargs), x))
    return lane_stable(lambda piece: func(piece, *rest, **kwargs), x)


def _out_of_place(func: torch._ops.OpOverload) -> Callable[..., torch.Tensor]:
    """``aten.exp_.default`` -> ``aten.exp.default`` (the overload of the same name)."""
    name = func._schema.name.split("::")[1][:-1]
    packet = getattr(torch.ops.aten, name)
    return getattr(packet, func._overloadname)  # type: ignore[no-any-return]


@functools.cache
def is_transcendental(func: torch._ops.OpOverload) -> bool:
    """Whether the mode evaluates ``func`` lane-aligned: a listed op of one tensor argument, not an ``out=`` one."""
    namespace, _, name = func._schema.name.partition("::")
    base = name[:-1] if name.endswith("_") else name
    if namespace != "aten" or base not in TRANSCENDENTAL or "out" in func._overloadname:
        return False
    arguments = func._schema.arguments  # one tensor, the first: other arguments are scalars or options
    return bool(arguments) and str(arguments[0].type) == "Tensor" and all(
        "Tensor" not in str(a.type) for a in arguments[1:]
    )
