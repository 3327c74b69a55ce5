"""Strict numerics makes no order-dependent floating-point reduction: proved by running the model under
:class:`~kvverify.invariant.audit.OrderAudit`, which sees every aten op. Plus meta-tests of the audit itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from kvverify import BUILTIN_CACHES, ModelConfig, ReferenceModel
from kvverify.invariant.audit import OrderAudit

# --- the strict model under the audit ---------------------------------------------------------------------

# Every positional scheme, norm, dtype and built-in cache twice; GQA, MQA and MHA; windows with a ring and
# with caches that keep everything. head_dim 8, keys up to 8 long (the window: 3 or 4).
MODEL_CASES = [
    ("rope", "rms", torch.float32, 2, None, "contiguous"),
    ("rope", "layer", torch.bfloat16, 1, 3, "sliding"),
    ("learned", "rms", torch.float64, 4, None, "static"),
    ("learned", "layer", torch.float16, 2, 4, "paged"),
    ("alibi", "rms", torch.float16, 1, None, "paged"),
    ("alibi", "layer", torch.float32, 2, 3, "sliding"),
    ("none", "rms", torch.bfloat16, 2, None, "static"),
    ("none", "layer", torch.float64, 1, 3, "contiguous"),
]


def _case_id(case: tuple[Any, ...]) -> str:
    positional, norm, dtype, n_kv_heads, window, cache = case
    heads = {1: "mqa", 2: "gqa", 4: "mha"}[n_kv_heads]
    return f"{positional}-{norm}-{str(dtype).removeprefix('torch.')}-{heads}-w{window}-{cache}"


@pytest.mark.parametrize("case", MODEL_CASES, ids=_case_id)
def test_strict_model_makes_no_order_dependent_reduction(case: tuple[Any, ...]) -> None:
    positional, norm, dtype, n_kv_heads, window, cache_name = case
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, d_ff=32,
                         norm=norm, positional=positional, sliding_window=window, max_seq_len=12,
                         max_batch_size=3, dtype=dtype, numerics="strict")
    model = ReferenceModel(config, seed=0)
    prompt = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])  # (B, T): left padding
    cache = BUILTIN_CACHES[cache_name](config)
    with OrderAudit() as audit:
        model.generate(prompt, 4, cache=cache, attention_mask=mask)
        model.generate(prompt, 4, use_cache=False, attention_mask=mask)
    assert audit.calls > 100, f"the audit saw only {audit.calls} op calls: is the dispatch mode active?"
    assert not audit.violations, audit.report()


# --- the audit catches every forbidden kind ---------------------------------------------------------------

g = torch.Generator().manual_seed(0)
X3 = torch.randn(4, 3, generator=g)  # rows of 3: every float reduction over them is order-dependent
X2 = torch.randn(4, 2, generator=g)  # rows of 2: a plain sum is a + b, exact in either order
Q = torch.randn(1, 2, 3, 8, generator=g)  # (B, H, T, D)
ONES3 = torch.ones(3)
SAME_SLOT = torch.tensor([0, 0, 1])  # two of three sources land on slot 0

FORBIDDEN: dict[str, tuple[Callable[[], object], str]] = {
    "sum over 3": (lambda: X3.sum(-1), "aten.sum.dim_IntList"),
    "sum of all": (lambda: X3.sum(), "aten.sum.default"),
    "mean": (lambda: X3.mean(-1), "aten.mean.dim"),
    "matmul": (lambda: X3 @ X3.T, "aten.mm"),
    "batched matmul": (lambda: Q @ Q.transpose(-1, -2), "aten.bmm"),
    "linear with bias": (lambda: F.linear(X3, X3, torch.ones(4)), "aten.addmm"),
    "dot over 2 (a fused multiply-add or not)": (lambda: torch.dot(X2[0], X2[1]), "aten.dot"),
    "cumsum": (lambda: X3.cumsum(-1), "aten.cumsum"),
    "softmax": (lambda: F.softmax(X3, -1), "aten._softmax"),
    "softmax over 2": (lambda: F.softmax(X2, -1), "aten._softmax"),
    "logsumexp": (lambda: X3.logsumexp(-1), "aten.logsumexp"),
    "sdpa": (lambda: F.scaled_dot_product_attention(Q, Q, Q), "aten._scaled_dot_product"),
    "index_add": (lambda: torch.zeros(2).index_add_(0, SAME_SLOT, ONES3), "aten.index_add"),
    "scatter_add": (lambda: torch.zeros(2).scatter_add_(0, SAME_SLOT, ONES3), "aten.scatter_add"),
    "scatter_reduce sum": (lambda: torch.zeros(2).scatter_reduce(0, SAME_SLOT, ONES3, "sum"), "aten.scatter_reduce"),
    "index_put accumulate": (lambda: torch.zeros(2).index_put_((SAME_SLOT,), ONES3, accumulate=True),
                             "aten.index_put"),
    "var": (lambda: torch.var(X3, -1), "aten.var"),
    "layer_norm": (lambda: F.layer_norm(X3, (3,)), "aten.native_layer_norm"),
    "vector norm": (lambda: torch.linalg.vector_norm(X3, dim=-1), "aten.linalg_vector_norm"),
    "unclassified op": (lambda: torch.histc(X3), "aten.histc"),
}


@pytest.mark.parametrize("name", FORBIDDEN)
def test_audit_catches(name: str) -> None:
    call, op = FORBIDDEN[name]
    with OrderAudit() as audit:
        call()
    ops = [v.op for v in audit.violations]
    assert any(o.startswith(op) for o in ops), f"{name}: expected {op} among the violations; got {ops}"
    located = [v.location for v in audit.violations]
    assert all("test_strict_audit.py" in where for where in located), f"{name}: not located here: {located}"


ALLOWED: dict[str, Callable[[], object]] = {
    "sum over 2": lambda: X2.sum(-1),
    "mean over 2": lambda: X2.mean(-1),
    "cumsum over 2": lambda: X2.cumsum(-1),
    "sum over 1": lambda: X3[:, :1].sum(-1),
    "matmul with inner dimension 1": lambda: X3[:, :1] @ X3[:1],
    "amax, max, min": lambda: (X3.amax(-1), X3.max(), X3.min(-1)),
    "argmax, argmin": lambda: (X3.argmax(-1), X3.argmin()),
    "integer and bool sums": lambda: (torch.arange(9).sum(), (X3 > 0).sum(-1), torch.arange(9).cumsum(0)),
    "integer matmul": lambda: torch.arange(9).view(3, 3) @ torch.arange(9).view(3, 3),
    "elementwise": lambda: (X3 * X3 + 1).exp().rsqrt().where(X3 > 0, X3).masked_fill(X3 < -1, 0.0),
    "gather, index, index_select": lambda: (X3.gather(-1, torch.zeros(4, 1, dtype=torch.long)), X3[SAME_SLOT],
                                            X3.index_select(0, SAME_SLOT)),
    "cat, stack, split, views": lambda: (torch.cat((X3, X3)), torch.stack((X3, X3)), X3.split(1), X3.T.reshape(-1)),
    "writes without accumulation": lambda: (torch.zeros(2).index_put_((SAME_SLOT,), ONES3),
                                            torch.zeros(2).scatter(0, SAME_SLOT, ONES3),
                                            torch.zeros(3, 3).index_copy_(0, SAME_SLOT, X3[:3])),
    "order-free scatter": lambda: torch.zeros(2).scatter_reduce(0, SAME_SLOT, ONES3, "amax"),
    "max norm": lambda: torch.linalg.vector_norm(X3, ord=float("inf"), dim=-1),
    "sort, topk": lambda: (X3.sort(-1), X3.topk(2, -1)),
}


@pytest.mark.parametrize("name", ALLOWED)
def test_audit_allows(name: str) -> None:
    with OrderAudit() as audit:
        ALLOWED[name]()
    assert audit.calls > 0
    assert not audit.violations, audit.report()


def test_audit_reports_op_extent_dtype_shape_and_line() -> None:
    with OrderAudit() as audit:
        for _ in range(2):
            X3.to(torch.float64).sum(-1)
    (violation,) = audit.violations
    assert (violation.op, violation.family, violation.dtype) == ("aten.sum.dim_IntList", "sum", "float64")
    assert (violation.extent, violation.shapes, audit.count(violation)) == (3, ((4, 3),), 2)
    report = audit.report()
    assert "aten.sum.dim_IntList (sum) over 3..3 elements, 2 calls, float64, at tests/test_strict_audit.py:" \
        in report, report
    # Shapes, names and counts only: the audit keeps no tensor alive.
    fields = tree_leaves(dataclasses.astuple(violation))
    assert not any(isinstance(f, torch.Tensor) for f in fields), fields


def test_audit_names_the_kvverify_line() -> None:
    from kvverify.reference import fast as kernels

    with OrderAudit() as audit:
        kernels.linear(X3, X3)  # F.linear: a matmul inside kvverify
    assert audit.violations, audit.report()
    assert audit.violations[0].location.startswith("kvverify/reference/fast.py:"), audit.report()


def test_unknown_ops_pass_when_not_flagged() -> None:
    with OrderAudit(flag_unknown=False) as audit:
        torch.histc(X3)
    assert not audit.violations, audit.report()
