"""An audit of the floating-point reductions a piece of torch code runs, as a ``TorchDispatchMode``.

Strict numerics promises that an element's bits cannot depend on the shape of the tensor it sits in. A kernel
that reduces floating-point values (a sum, a matmul, a softmax, an accumulating scatter) chooses its order of
additions by the shape, the device and the thread count, so a strict path may reduce only in an order it
spells out itself with elementwise adds. :class:`OrderAudit` sees every aten op that runs while it is active
(after autograd and the composite decompositions: ``F.linear`` arrives as ``addmm`` or ``mm``, ``F.softmax`` as
``_softmax``) and records each one that breaks that rule, with the first line inside ``kvverify/`` that ran it::

    with OrderAudit() as audit:
        model.generate(prompt, 4, attention_mask=mask)
    assert not audit.violations, audit.report()

An op is recorded when one of its results is floating point (or complex) and

1. it is in :data:`ORDER_DEPENDENT` and reduces more elements per result than its family allows: two for a
   plain sum or product (``a + b`` and ``a * b`` are exact in either order), one for everything else (a
   two-term dot product ``a*b + c*d`` already depends on whether the kernel fuses a multiply-add); or
2. it is neither there nor known to be order-free (:data:`ORDER_FREE`, the ``pointwise`` tag, a view):
   an unknown op is a failure until someone classifies it here.

Integer and bool reductions are exact in any order and are never recorded; nor are order-free reductions
(``max``, ``amax``, ``min``, ``amin``, ``argmax``, ``argmin``, ``all``, ``any``, sorts and selections).

ORDER_DEPENDENT, by family, with the extent that is measured (the elements reduced into one result):

- sums: ``sum``, ``nansum``, ``mean``, ``prod``, ``cumsum``, ``cumprod``: the elements over ``dim`` (all
  when none is given); scans count their whole length.
- accumulating scatters: ``scatter_add``, ``scatter_reduce`` (sum, prod, mean), ``scatter`` with ``reduce=``,
  ``index_add``, ``index_reduce`` (prod, mean), ``index_put``/``_index_put_impl``/``_unsafe_index_put`` with
  ``accumulate=True``, ``embedding_bag`` (sum, mean), ``bincount`` with weights: the destination plus every
  index that may land on it (a bound read from shapes, never from the indices, so nothing syncs or copies).
  On CUDA these use atomics, whose order changes from run to run.
- fused sums (the rest allow one element): ``logsumexp``, ``logcumsumexp``, ``_softmax``, ``_log_softmax``,
  ``_safe_softmax`` (over ``dim``); ``var``, ``std``, ``var_mean``, ``std_mean``, ``norm``,
  ``linalg_vector_norm`` (except ``ord=inf``), ``frobenius_norm``, ``renorm``, ``_weight_norm_interface``,
  ``dist``, ``trace``.
- matmul-like (the inner dimension): ``mm``, ``bmm``, ``addmm``, ``_addmm_activation``, ``baddbmm``, ``addbmm``
  (also the batch), ``mv``, ``addmv``, ``dot``, ``vdot``, ``inner``, ``matmul``, ``linear``, ``mkldnn_linear``,
  ``_scaled_mm``, ``_grouped_mm``, ``_scaled_grouped_mm``, ``_weight_int8pack_mm``, ``_weight_int4pack_mm``,
  ``_weight_int4pack_mm_for_cpu``, ``_mixed_dtypes_linear``, ``_int_mm`` (exempt: integer), ``_cdist_forward``,
  ``_pdist_forward``, ``_euclidean_dist``, convolutions (``convolution``, ``_convolution``,
  ``mkldnn_convolution``, ``_slow_conv2d_forward``, ``cudnn_convolution``) and average pools.
- attention (the larger of head_dim and the key count): ``scaled_dot_product_attention`` and every
  ``_scaled_dot_product_*`` kernel, ``_flash_attention_forward``, ``_efficient_attention_forward``.
- norms (the normalized elements): ``native_layer_norm``, ``rms_norm``, ``_fused_rms_norm``,
  ``native_group_norm``, ``native_batch_norm`` / ``_native_batch_norm_legit`` in training, ``batch_norm_stats``.
- linear algebra and transforms (the last dimension, or the transformed ones): ``_linalg_det``,
  ``_linalg_slogdet``, ``_linalg_svd``, ``_linalg_eigh``, ``linalg_eig``, ``_linalg_solve_ex``,
  ``linalg_solve_triangular``, ``linalg_cholesky_ex``, ``linalg_lu_factor_ex``, ``linalg_lu``, ``linalg_qr``,
  ``linalg_inv_ex``, ``triangular_solve``, ``cholesky_solve``, ``nuclear_norm``, ``linalg_matrix_norm``,
  ``_fft_r2c``, ``_fft_c2c``, ``_fft_c2r``.
- losses with a reduction, and the per-sample sums of ``multi_margin_loss``, ``multilabel_margin_loss_forward``.

The audit keeps shapes, dtypes and code locations, never a tensor: its memory grows with the number of
distinct offending calls, not with their size.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: The directory holding the ``kvverify`` package: a frame whose file lies below it is "inside kvverify/".
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PACKAGE = os.path.join(_ROOT, "kvverify") + os.sep
_THIS_FILE = os.path.abspath(__file__)
_STACK_DEPTH = 3  # kvverify frames kept per record: the op's line and two callers

Bound = Mapping[str, Any]  # an op's arguments by schema name, defaults filled in
Extent = Callable[[Bound], int]


# --- extents: how many elements an op reduces into one result, from shapes and arguments alone -------------


def _size(t: torch.Tensor, dim: int) -> int:
    return int(t.shape[dim % t.dim()]) if t.dim() else 1


def _over_dim(name: str = "self", dims: str = "dim") -> Extent:
    """The elements over ``dims`` (an int, a list, or None/[] for every dimension)."""

    def extent(b: Bound) -> int:
        t, dim = b[name], b.get(dims)
        if dim is None or (isinstance(dim, (list, tuple)) and not dim):
            return int(t.numel())
        return math.prod(_size(t, d) for d in ([dim] if isinstance(dim, int) else dim))

    return extent


def _last(name: str) -> Extent:
    return lambda b: _size(b[name], -1)


def _first_last(b: Bound) -> int:
    """The last dimension of the first tensor argument (a matrix's rows are reduced against it)."""
    return next((_size(v, -1) for v in b.values() if isinstance(v, torch.Tensor)), 1)


def _numel(name: str) -> Extent:
    return lambda b: int(b[name].numel())


def _normalized(b: Bound) -> int:
    return math.prod(b["normalized_shape"])


def _attention(b: Bound) -> int:
    """q·k over head_dim, then softmax and the weighted sum over keys. q, k: (..., S, D)."""
    return max(_size(b["query"], -1), _size(b["key"], -2))


def _attention_bshd(b: Bound) -> int:
    """The same for the (B, S, H, D) layout of the flash and efficient forward kernels."""
    return max(_size(b["query"], -1), _size(b["key"], 1))


def _vector_norm(b: Bound) -> int:
    ord_ = b.get("ord", b.get("p"))
    if ord_ is not None and math.isinf(float(ord_)):
        return 1  # a max: order-free
    return _over_dim()(b)


def _scatter(default: str | None) -> Extent:
    """The destination plus every index along ``dim`` that may land on it. ``default``: the reduction when the
    op takes no ``reduce`` argument (``scatter_add``: a sum; ``scatter``: a plain write)."""

    def extent(b: Bound) -> int:
        reduce = b.get("reduce", default)
        if reduce is None or reduce in ("amax", "amin"):
            return 1
        return int(b.get("include_self", True)) + _size(b["index"], b["dim"])

    return extent


def _index_add(b: Bound) -> int:
    if b.get("reduce", "sum") in ("amax", "amin"):
        return 1
    return int(b.get("include_self", True)) + int(b["index"].numel())


def _index_put(b: Bound) -> int:
    if not b.get("accumulate"):
        return 1
    return 1 + max((int(i.numel()) for i in b["indices"] if i is not None), default=1)


def _embedding_bag(b: Bound) -> int:
    return int(b["indices"].numel()) if b.get("mode", 0) in (0, 1) else 1  # modes: 0 sum, 1 mean, 2 max


def _bincount(b: Bound) -> int:
    return int(b["self"].numel()) if b.get("weights") is not None else 1


def _batch_norm(b: Bound) -> int:
    x = b["input"]
    return int(x.numel()) // max(_size(x, 1), 1) if b.get("training", True) else 1


def _group_norm(b: Bound) -> int:
    return (int(b["C"]) // max(int(b["group"]), 1)) * int(b["HxW"])


def _convolution(b: Bound) -> int:
    w = b["weight"]
    return int(w.numel()) // max(_size(w, 0), 1)


def _pool(b: Bound) -> int:
    kernel = b.get("kernel_size")
    if kernel is not None:
        return math.prod(kernel)
    x, out = b["self"], b["output_size"]  # adaptive: the widest window
    return math.prod(-(-_size(x, -i - 1) // max(int(o), 1)) for i, o in enumerate(reversed(out)))


def _loss(name: str = "self") -> Extent:
    return lambda b: int(b[name].numel()) if b.get("reduction", 1) != 0 else 1  # reduction 0: none


def _with_batch(b: Bound) -> int:
    return _size(b["batch1"], 0) * _size(b["batch1"], -1)


def _trace(b: Bound) -> int:
    return min(b["self"].shape) if b["self"].dim() else 1


def _renorm(b: Bound) -> int:
    x = b.get("self", b.get("v"))
    return int(x.numel()) // max(_size(x, b["dim"]), 1)


@dataclass(frozen=True)
class Rule:
    """How one op family reduces: its name in reports, the extent of one call, and the extent it may reach."""

    family: str
    extent: Extent
    allowed: int  # 2 where two elements reduce by one exact add or multiply, else 1


def _rules() -> dict[str, Rule]:
    sums = dict.fromkeys(("sum", "nansum", "mean", "prod"), _over_dim())
    scans = dict.fromkeys(("cumsum", "cumprod"), _over_dim())
    scatters: dict[str, Extent] = {
        "scatter_add": _scatter("sum"), "scatter_reduce": _scatter("sum"), "scatter": _scatter(None),
        "index_add": _index_add, "index_reduce": _index_add,
        "index_put": _index_put, "_index_put_impl": _index_put, "_unsafe_index_put": _index_put,
        "embedding_bag": _embedding_bag, "_embedding_bag": _embedding_bag,
        "_embedding_bag_forward_only": _embedding_bag, "bincount": _bincount,
    }
    fused: dict[str, Extent] = {
        **dict.fromkeys(("logsumexp", "special_logsumexp", "logcumsumexp", "_softmax", "_log_softmax",
                         "_safe_softmax", "var", "std", "var_mean", "std_mean", "frobenius_norm"), _over_dim()),
        "norm": _vector_norm, "linalg_vector_norm": _vector_norm,
        "renorm": _renorm, "_weight_norm_interface": _renorm, "dist": _numel("self"), "trace": _trace,
    }
    matmul: dict[str, Extent] = {
        **dict.fromkeys(("mm", "bmm", "mv", "matmul", "_scaled_mm", "_grouped_mm", "_scaled_grouped_mm",
                         "_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm",
                         "_pdist_forward"), _last("self")),
        **dict.fromkeys(("dot", "vdot"), _numel("self")),
        "inner": _last("self"), "addmm": _last("mat1"), "_addmm_activation": _last("mat1"),
        "baddbmm": _last("batch1"), "addbmm": _with_batch, "addmv": _last("mat"),
        "linear": _last("input"), "mkldnn_linear": _last("self"), "_mixed_dtypes_linear": _last("input"),
        "_cdist_forward": _last("x1"), "_euclidean_dist": _last("x1"),
        **dict.fromkeys(("convolution", "_convolution", "mkldnn_convolution", "_slow_conv2d_forward",
                         "cudnn_convolution"), _convolution),
        **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "_adaptive_avg_pool2d",
                         "_adaptive_avg_pool3d"), _pool),
    }
    attention: dict[str, Extent] = {
        **dict.fromkeys(("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                         "_scaled_dot_product_attention_math_for_mps", "_scaled_dot_product_flash_attention",
                         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable"),
                        _attention),
        "_flash_attention_forward": _attention_bshd, "_efficient_attention_forward": _attention_bshd,
    }
    norms: dict[str, Extent] = {
        "native_layer_norm": _normalized, "rms_norm": _normalized, "_fused_rms_norm": _normalized,
        "native_group_norm": _group_norm, "native_batch_norm": _batch_norm, "_native_batch_norm_legit": _batch_norm,
        "batch_norm_stats": lambda b: int(b["input"].numel()) // max(_size(b["input"], 1), 1),
    }
    linalg: dict[str, Extent] = {
        **dict.fromkeys(("_linalg_det", "_linalg_slogdet", "_linalg_svd", "_linalg_eigh", "linalg_eig",
                         "linalg_cholesky_ex", "linalg_lu_factor_ex", "linalg_lu", "linalg_qr", "linalg_inv_ex",
                         "nuclear_norm", "linalg_matrix_norm", "_linalg_solve_ex", "linalg_solve_triangular",
                         "triangular_solve", "cholesky_solve"), _first_last),
        **dict.fromkeys(("_fft_r2c", "_fft_c2c", "_fft_c2r"), _over_dim()),
    }
    losses: dict[str, Extent] = {
        **dict.fromkeys(("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                         "soft_margin_loss", "kl_div"), _loss()),
        **dict.fromkeys(("nll_loss_forward", "nll_loss2d_forward"), _loss("target")),
        **dict.fromkeys(("multi_margin_loss", "multilabel_margin_loss_forward"), _last("self")),
    }
    rules = {name: Rule("sum", extent, 2) for name, extent in {**sums, **scans}.items()}
    rules |= {name: Rule("accumulating scatter", extent, 2) for name, extent in scatters.items()}
    for family, table in (("fused reduction", fused), ("matmul", matmul), ("attention", attention),
                          ("norm", norms), ("linear algebra", linalg), ("loss", losses)):
        rules |= {name: Rule(family, extent, 1) for name, extent in table.items()}
    return rules


#: Order-dependent ops by aten name (in-place variants share their base name), with how to measure them.
ORDER_DEPENDENT: dict[str, Rule] = _rules()

#: Ops that are not tagged ``pointwise`` nor views but whose float results do not depend on an order of
#: reduction: creation, copies and casts, indexing, gathers and plain scatters, joins, pads, order-free
#: reductions (max, amax, argmax, all...), sorts and selections, random draws, metadata.
ORDER_FREE: frozenset[str] = frozenset((
    # creation, copies, casts, metadata
    "_to_copy", "_local_scalar_dense", "clone", "copy", "_copy_from", "_copy_from_and_resize", "lift_fresh",
    "lift_fresh_copy", "detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "new_zeros", "new_ones", "new_full", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "scalar_tensor", "arange", "linspace", "logspace", "eye", "fill", "zero", "resize", "resize_as", "set",
    "promote_types", "result_type", "_assert_async", "_assert_scalar", "_assert_tensor_metadata", "equal",
    "_pin_memory", "native_dropout", "_efficientzerotensor", "_to_dense", "_unsafe_view", "_reshape_alias",
    "as_strided", "_neg_view", "_conj", "resolve_conj", "resolve_neg",
    # indexing, gathers, writes without accumulation, joins, layout
    "index", "_unsafe_index", "index_select", "gather", "take", "embedding", "index_copy", "index_fill",
    "masked_scatter", "masked_select", "nonzero", "nonzero_static", "slice_scatter", "select_scatter",
    "diagonal_scatter", "as_strided_scatter", "cat", "stack", "_chunk_cat", "split", "split_with_sizes",
    "unbind", "chunk", "roll", "flip", "repeat", "repeat_interleave", "constant_pad_nd", "reflection_pad1d",
    "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "tril", "triu", "diag", "diag_embed", "block_diag", "one_hot", "floor_divide", "glu",
    # order-free reductions, sorts, selections
    "max", "min", "amax", "amin", "aminmax", "argmax", "argmin", "all", "any", "cummax", "cummin",
    "_cummax_helper", "_cummin_helper", "sort", "argsort", "msort", "topk", "kthvalue", "median", "nanmedian",
    "mode", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "searchsorted", "bucketize",
    "isin", "count_nonzero",
    # random draws
    "rand", "randn", "randint", "randperm", "normal", "uniform", "bernoulli", "exponential", "random",
))


def _base_name(func: torch._ops.OpOverload) -> str:
    """``aten::index_put_`` -> ``index_put``; other namespaces keep their prefix (``prims::sum``)."""
    name = func._schema.name
    namespace, _, name = name.partition("::")
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name if namespace == "aten" else f"{namespace}::{name}"


def _is_view(func: torch._ops.OpOverload) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@functools.cache
def _classify(func: torch._ops.OpOverload) -> Rule | str:
    """The op's rule, or "free" (order-free: listed, pointwise or a view), or "unknown"."""
    name = _base_name(func)
    if name in ORDER_DEPENDENT:
        return ORDER_DEPENDENT[name]
    if name in ORDER_FREE or torch.Tag.pointwise in func.tags or _is_view(func):
        return "free"
    return "unknown"


def bind(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _kvverify_frames(depth: int) -> tuple[str, ...]:
    """The innermost ``depth`` frames inside kvverify/ (this file excluded), as ``path:line (function)``;
    the first frame outside torch when none is (code under test elsewhere, a test's own lines)."""
    found: list[str] = []
    outside: str | None = None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and len(found) < depth:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename != _THIS_FILE:
            where = f"{os.path.relpath(filename, _ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"
            if filename.startswith(_PACKAGE):
                found.append(where)
            elif outside is None and f"{os.sep}torch{os.sep}" not in filename:
                outside = where
        frame = frame.f_back
    return tuple(found) if found else ((outside,) if outside else ("<unknown>",))


@dataclass(frozen=True)
class Violation:
    """One op call the strict path may not make: what ran, on what, over how many elements, from where."""

    op: str  # the overload, e.g. "aten.sum.dim_IntList"
    family: str  # the Rule's family, or "unclassified"
    dtype: str  # of the first floating-point result
    shapes: tuple[tuple[int, ...], ...]  # of the tensor arguments, in order
    extent: int | None  # elements reduced into one result; None for an unclassified op
    stack: tuple[str, ...]  # innermost first: "kvverify/reference/numerics.py:49 (linear)", then its callers

    @property
    def location(self) -> str:
        return self.stack[0]


class OrderAudit(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves the mode untyped
    """Records every op call whose floating-point result depends on an order of reduction (see the module
    docstring). ``flag_unknown=False`` records only the ops of :data:`ORDER_DEPENDENT`."""

    def __init__(self, *, flag_unknown: bool = True) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.flag_unknown = flag_unknown
        self.calls = 0  # every op seen
        self._counts: dict[Violation, int] = {}  # distinct violations, first seen first, with their call counts

    def __enter__(self) -> OrderAudit:
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]

    @property
    def violations(self) -> list[Violation]:
        """Distinct violations, in the order first seen (:meth:`count` gives how many calls each)."""
        return list(self._counts)

    def count(self, violation: Violation) -> int:
        return self._counts.get(violation, 0)

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls += 1
        floating = next((t for t in _tensors(out) if _floating(t)), None)
        if floating is None:  # integer, bool or no tensor result: exact in any order
            return out
        rule = _classify(func)
        if isinstance(rule, Rule):
            try:
                extent: int | None = rule.extent(bind(func, args, kwargs))
            except Exception:  # an overload whose arguments the rule does not know: flag it, unmeasured
                extent = None
            if extent is None or extent > rule.allowed:
                self._record(func, rule.family, floating, args, kwargs, extent)
        elif rule == "unknown" and self.flag_unknown:
            self._record(func, "unclassified", floating, args, kwargs, None)
        return out

    def _record(
        self,
        func: torch._ops.OpOverload,
        family: str,
        result: torch.Tensor,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        extent: int | None,
    ) -> None:
        shapes = tuple(tuple(t.shape) for t in _tensors((args, kwargs)))
        key = Violation(str(func), family, str(result.dtype).removeprefix("torch."), shapes, extent,
                        _kvverify_frames(_STACK_DEPTH))
        self._counts[key] = self._counts.get(key, 0) + 1

    def report(self, *, shapes_shown: int = 3) -> str:
        """The violations grouped by op and line: calls, extents, dtypes, a few shapes, and the callers."""
        if not self._counts:
            return f"OrderAudit: no order-dependent floating-point op in {self.calls} op calls."
        groups: dict[tuple[str, str, str], list[Violation]] = {}
        for v in self._counts:
            groups.setdefault((v.family, v.op, v.location), []).append(v)
        total = sum(self._counts.values())
        lines = [f"OrderAudit: {total} order-dependent floating-point op calls ({len(groups)} kinds) "
                 f"in {self.calls} op calls:"]
        for (family, op, location), members in sorted(groups.items()):
            calls = sum(self._counts[v] for v in members)
            extents = sorted({v.extent for v in members if v.extent is not None})
            over = f" over {extents[0]}..{extents[-1]} elements" if extents else ""
            dtypes = ", ".join(sorted({v.dtype for v in members}))
            lines.append(f"- {op} ({family}){over}, {calls} calls, {dtypes}, at {location}")
            callers = sorted({" <- ".join(v.stack[1:]) for v in members if len(v.stack) > 1})
            lines.extend(f"    called from {c}" for c in callers)
            shown = list(dict.fromkeys(v.shapes for v in members))
            lines.append("    shapes " + "; ".join(str(s) for s in shown[:shapes_shown])
                         + (f"; ... ({len(shown)} in all)" if len(shown) > shapes_shown else ""))
        lines.append(
            "Strict numerics must reduce in an order it writes itself (elementwise adds); an op listed as "
            "unclassified that is order-free belongs in ORDER_FREE in kvverify/invariant/audit.py."
        )
        return "\n".join(lines)
