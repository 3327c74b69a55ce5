"""The aten ops the mode replaces, each bound to its kernel by the op's schema.

An op arrives as torch's dispatcher calls it, after autograd and the composite decompositions: ``F.linear``
as ``addmm`` or ``mm`` (a 3-d input that is not contiguous: ``bmm``), ``torch.matmul`` as ``mm`` or ``bmm``,
``F.softmax`` as ``_softmax``, a module's RMSNorm as ``pow``, ``mean`` and ``rsqrt``. Overloads with ``out=``
and integer inputs pass through to torch (integer sums are exact in any order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvverify.invariant import attention, norms, ordered, reductions

aten = torch.ops.aten
Bound = dict[str, Any]


def _mm(b: Bound) -> torch.Tensor:
    return ordered.matmul(b["self"][None], b["mat2"][None])[0]


def _bmm(b: Bound) -> torch.Tensor:
    return ordered.matmul(b["self"], b["mat2"])


def _scaled(product: torch.Tensor, bias: torch.Tensor, beta: Any, alpha: Any) -> torch.Tensor:
    """``beta * bias + alpha * product`` as torch's addmm defines it (beta 0: the bias is ignored, NaN or not)."""
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product
    return product + (bias if beta == 1 else bias * beta)


def _addmm(b: Bound) -> torch.Tensor:
    return _scaled(_mm({"self": b["mat1"], "mat2": b["mat2"]}), b["self"], b["beta"], b["alpha"])


def _baddbmm(b: Bound) -> torch.Tensor:
    return _scaled(ordered.matmul(b["batch1"], b["batch2"]), b["self"], b["beta"], b["alpha"])


def _mv(b: Bound) -> torch.Tensor:
    return _mm({"self": b["self"], "mat2": b["vec"][:, None]})[:, 0]


def _addmv(b: Bound) -> torch.Tensor:
    return _scaled(_mv({"self": b["mat"], "vec": b["vec"]}), b["self"], b["beta"], b["alpha"])


def _dot(b: Bound) -> torch.Tensor:
    return _mm({"self": b["self"][None], "mat2": b["tensor"][:, None]})[0, 0]


def _linear(b: Bound) -> torch.Tensor:
    x, weight, bias = b["input"], b["weight"], b["bias"]
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 1 else x[None]
    out = _mm({"self": rows, "mat2": weight.T}).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _softmax(b: Bound) -> torch.Tensor:
    return reductions.softmax(b["self"], b["dim"], b["half_to_float"])


def _safe_softmax(b: Bound) -> torch.Tensor:
    x = b["self"] if b["dtype"] is None else b["self"].to(b["dtype"])
    return reductions.softmax(x, b["dim"], safe=True)


def _log_softmax(b: Bound) -> torch.Tensor:
    return reductions.log_softmax(b["self"], b["dim"], b["half_to_float"])


def _sum(b: Bound) -> torch.Tensor:
    return reductions.reduce_sum(b["self"], b.get("dim"), bool(b.get("keepdim")), b["dtype"])


def _mean(b: Bound) -> torch.Tensor:
    return reductions.reduce_mean(b["self"], b.get("dim"), bool(b.get("keepdim")), b["dtype"])


def _logsumexp(b: Bound) -> torch.Tensor:
    return reductions.logsumexp(b["self"], b["dim"], b["keepdim"])


def _layer_norm(b: Bound) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norms.layer_norm(b["input"], b["normalized_shape"], b["weight"], b["bias"], b["eps"])


def _fused_rms_norm(b: Bound) -> tuple[torch.Tensor, torch.Tensor]:
    return norms.rms_norm(b["input"], b["normalized_shape"], b["weight"], b["eps"])


def _flash_for_cpu(b: Bound) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention.attention(b["query"], b["key"], b["value"], b["attn_mask"], b["dropout_p"],
                                   b["is_causal"], b["scale"], with_lse=True)
    assert lse is not None
    return out, lse


def _sdpa(b: Bound) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` itself, which arrives whole under inference_mode."""
    return attention.attention(b["query"], b["key"], b["value"], b["attn_mask"], b["dropout_p"], b["is_causal"],
                               b["scale"], b["enable_gqa"])[0]


Kernel = Callable[[Bound], Any]

#: Every replaced overload and its kernel. The float-only ones check their input below (:func:`applies`).
KERNELS: dict[torch._ops.OpOverload, Kernel] = {
    aten.mm.default: _mm, aten.bmm.default: _bmm, aten.addmm.default: _addmm, aten.baddbmm.default: _baddbmm,
    aten.mv.default: _mv, aten.addmv.default: _addmv, aten.dot.default: _dot, aten.linear.default: _linear,
    aten._softmax.default: _softmax, aten._safe_softmax.default: _safe_softmax,
    aten._log_softmax.default: _log_softmax, aten.logsumexp.default: _logsumexp,
    aten.sum.default: _sum, aten.sum.dim_IntList: _sum, aten.mean.default: _mean, aten.mean.dim: _mean,
    aten.native_layer_norm.default: _layer_norm, aten._fused_rms_norm.default: _fused_rms_norm,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _flash_for_cpu,
    aten.scaled_dot_product_attention.default: _sdpa,
}

#: Fused attention kernels the mode does not replace: it routes ``F.scaled_dot_product_attention`` around them.
FUSED_ATTENTION: frozenset[str] = frozenset((
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward", "_efficient_attention_forward",
))


def applies(func: torch._ops.OpOverload, args: Sequence[Any]) -> bool:
    """Whether the mode's kernel replaces this call: a listed op whose first tensor is floating point."""
    if func not in KERNELS:
        return False
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and first.is_floating_point()
