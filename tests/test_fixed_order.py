"""The native fixed-order kernels (kvverify.reference.fixed_order) against the pure-PyTorch paths they replace
(strict numerics' trees, the invariant mode's left-to-right sums): the same bits over drawn shapes, strides and
all four dtypes, and the behaviour that makes strict numerics bitwise (a row alone ≡ in a batch of every size ≡
with masked keys before, between and after)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvverify.invariant import ordered
from kvverify.reference import fixed_order, numerics

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EXAMPLES = settings(max_examples=100, deadline=None, database=None, derandomize=True)

pytestmark = pytest.mark.skipif(not fixed_order.applies(torch.zeros(1)),
                                reason="the native kernel is off (KVVERIFY_KERNELS=python) or could not be built")


def _both(fn: Callable[..., torch.Tensor], *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(*args) with the native kernel, then with the pure-PyTorch path."""
    native = fn(*args)
    with fixed_order.use("python"):
        python = fn(*args)
    return native, python


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers, so that -0 ≠ +0 and NaNs compare by payload."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_bits(native: torch.Tensor, python: torch.Tensor, what: str) -> None:
    assert native.dtype == python.dtype and native.shape == python.shape, (
        f"{what}: native {native.dtype} {tuple(native.shape)}, python {python.dtype} {tuple(python.shape)}")
    differ = _bits(native) != _bits(python)
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ in their bits, "
                              f"first at {tuple(int(i) for i in differ.nonzero()[0])}")


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values with some exact zeros of both signs and a few large ones (products that round)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    draw = torch.rand(shape, generator=generator, dtype=torch.float64)
    x = torch.where(draw < 0.05, torch.zeros_like(x), x)
    x = torch.where((draw >= 0.05) & (draw < 0.1), -torch.zeros_like(x), x)
    x = torch.where(draw > 0.97, x * 1e4, x)
    return x.to(dtype)


@EXAMPLES
@given(groups=st.integers(1, 3), rows=st.integers(1, 14), n=st.integers(1, 300), columns=st.integers(1, 160),
       double=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "broadcast"]), seed=st.integers(0, 9))
def test_tree_matmul_gives_tree_sums_bits(groups: int, rows: int, n: int, columns: int, double: bool, layout: str,
                                          seed: int) -> None:
    dtype = torch.float64 if double else torch.float32
    x = _values((groups, rows, n), dtype, seed)
    b = _values((groups, n, columns), dtype, seed + 100)
    if layout == "transposed":  # b's columns contiguous in k, as W.T of a linear layer
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "broadcast":  # one b for every group (a zero stride)
        b = b[:1].expand(groups, n, columns)
    expected = numerics.tree_sum(x[:, :, :, None] * b[:, None, :, :], 2)
    _assert_same_bits(fixed_order.tree_matmul(x, b), expected, f"tree_matmul {layout} {tuple(x.shape)}@{columns}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(batch=st.integers(1, 3), m=st.integers(1, 14), k=st.integers(0, 200), n=st.integers(1, 40),
       layout=st.sampled_from(["contiguous", "transposed", "broadcast"]), seed=st.integers(0, 9))
def test_ordered_matmul_is_bitwise_the_invariant_modes_python_path(dtype: torch.dtype, batch: int, m: int, k: int,
                                                                   n: int, layout: str, seed: int) -> None:
    a, b = _values((batch, m, k), dtype, seed), _values((batch, k, n), dtype, seed + 1)
    if layout == "transposed":
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "broadcast":
        b = b[:1].expand(batch, k, n)
    native, python = _both(ordered.matmul, a, b)
    _assert_same_bits(native, python, f"ordered.matmul {layout} {tuple(a.shape)} @ {tuple(b.shape)}, {dtype}")


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3), length=st.integers(0, 300),
       dim=st.integers(0, 3), double=st.booleans(), seed=st.integers(0, 9))
def test_tree_sum_is_bitwise_the_python_path(shape: list[int], length: int, dim: int, double: bool,
                                             seed: int) -> None:
    dim = dim % (len(shape) + 1)
    x = _values((*shape[:dim], length, *shape[dim:]), torch.float64 if double else torch.float32, seed)
    native, python = _both(numerics.tree_sum, x, dim)
    _assert_same_bits(native, python, f"tree_sum over dim {dim} of {tuple(x.shape)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(lead=st.sampled_from([(1,), (5,), (2, 3), (1, 1, 7)]), d_in=st.integers(1, 260), d_out=st.integers(1, 70),
       seed=st.integers(0, 9))
def test_linear_is_bitwise_the_python_path(dtype: torch.dtype, lead: tuple[int, ...], d_in: int, d_out: int,
                                           seed: int) -> None:
    x = _values((*lead, d_in), dtype, seed)
    weight = torch.nn.Parameter(_values((d_out, d_in), dtype, seed + 1), requires_grad=False)
    native, python = _both(numerics.linear, x, weight)
    _assert_same_bits(native, python, f"linear {tuple(x.shape)} @ {tuple(weight.shape)}.T, {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=20, deadline=None, database=None, derandomize=True)
@given(lead=st.sampled_from([(1,), (5,), (2, 3), (1, 1, 7)]), d=st.integers(1, 260), layer=st.booleans(),
       seed=st.integers(0, 9))
def test_norms_are_bitwise_the_python_path(dtype: torch.dtype, lead: tuple[int, ...], d: int, layer: bool,
                                           seed: int) -> None:
    x = _values((*lead, d), dtype, seed)
    weight, bias = _values((d,), dtype, seed + 1), _values((d,), dtype, seed + 2)
    if layer:
        native, python = _both(numerics.layer_norm, x, weight, bias, 1e-5)
    else:
        native, python = _both(numerics.rms_norm, x, weight, 1e-5)
    _assert_same_bits(native, python, f"{'layer' if layer else 'rms'} norm of {tuple(x.shape)}, {dtype}")


def _mask(batch: int, t_q: int, s: int, layout: str, seed: int) -> torch.Tensor:
    """visible (B, 1, Tq, S): causal over the last Tq keys, with keys masked before, between or after."""
    generator = torch.Generator().manual_seed(seed)
    causal = torch.arange(s)[None, :] <= torch.arange(s - t_q, s)[:, None]  # (Tq, S), bottom-right aligned
    visible = causal[None, None].expand(batch, 1, t_q, s).clone()
    if layout == "before":  # left padding: each row's first keys masked
        for row in range(batch):
            visible[row, :, :, : int(torch.randint(0, s - t_q + 1, (1,), generator=generator))] = False
    elif layout == "between":  # holes among the visible keys (evicted or unwritten slots)
        visible &= torch.rand(batch, 1, 1, s, generator=generator) > 0.3
    elif layout == "after":  # a preallocated buffer: the last slots unwritten
        tail = int(torch.randint(1, max(2, s // 2), (1,), generator=generator))
        visible = torch.cat((visible, visible.new_zeros(batch, 1, t_q, tail)), dim=-1)
    visible[..., s - t_q :][..., torch.arange(t_q), torch.arange(t_q)] = True  # every query sees itself
    return visible


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(batch=st.integers(1, 3), heads=st.sampled_from([(1, 1), (4, 2), (6, 1), (4, 4)]), t_q=st.integers(1, 9),
       past=st.integers(0, 40), head_dim=st.sampled_from([2, 3, 8, 64]), layout=st.sampled_from(
           ["prefix", "before", "between", "after"]), bias=st.booleans(), seed=st.integers(0, 9))
def test_attention_is_bitwise_the_python_path(dtype: torch.dtype, batch: int,
                                              heads: tuple[int, int], t_q: int, past: int, head_dim: int,
                                              layout: str, bias: bool, seed: int) -> None:
    n_heads, n_kv_heads = heads
    visible = _mask(batch, t_q, past + t_q, layout, seed)
    s = visible.shape[-1]
    q = _values((batch, n_heads, t_q, head_dim), dtype, seed)
    k, v = _values((batch, n_kv_heads, s, head_dim), dtype, seed + 1), _values((batch, n_kv_heads, s, head_dim),
                                                                                 dtype, seed + 2)
    scores_bias = _values((batch, n_heads, t_q, s), dtype, seed + 3) if bias else None
    native, python = _both(numerics.attention, q, k, v, visible, scores_bias)
    _assert_same_bits(native, python, f"attention {layout}, q {tuple(q.shape)}, k {tuple(k.shape)}, {dtype}")


@pytest.mark.parametrize("layout", ["prefix", "before", "between", "after"])
def test_attention_in_chunks_of_queries_is_bitwise_the_python_path(monkeypatch: pytest.MonkeyPatch,
                                                                   layout: str) -> None:
    """Many chunks of queries (keys laid out once for all of them), each against its own span of keys."""
    monkeypatch.setattr(numerics, "_NATIVE_ATTENTION_CHUNK", 40)
    visible = _mask(2, 11, 30, layout, 3)
    s = visible.shape[-1]
    q = _values((2, 4, 11, 16), torch.bfloat16, 0)
    k, v = _values((2, 2, s, 16), torch.bfloat16, 1), _values((2, 2, s, 16), torch.bfloat16, 2)
    native, python = _both(numerics.attention, q, k, v, visible, None)
    _assert_same_bits(native, python, f"attention in chunks, keys masked {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_alone_equals_it_in_a_batch_of_every_size(dtype: torch.dtype) -> None:
    rows = _values((9, 2, 200), dtype, 0)
    weight = _values((48, 200), dtype, 1)
    alone = numerics.linear(rows[:1], weight)
    for size in range(1, 10):
        _assert_same_bits(numerics.linear(rows[:size], weight)[:1], alone, f"linear, row 0 in a batch of {size}")
    q, k, v = _values((9, 4, 3, 16), dtype, 2), _values((9, 2, 20, 16), dtype, 3), _values((9, 2, 20, 16), dtype, 4)
    visible = torch.ones(9, 1, 3, 20, dtype=torch.bool)
    alone = numerics.attention(q[:1], k[:1], v[:1], visible[:1], None)
    for size in range(1, 10):
        batched = numerics.attention(q[:size], k[:size], v[:size], visible[:size], None)
        _assert_same_bits(batched[:1], alone, f"attention, row 0 in a batch of {size}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["before", "between", "after", "around"])
def test_masked_keys_anywhere_change_no_bit(dtype: torch.dtype, where: str) -> None:
    q = _values((1, 4, 2, 32), dtype, 5)
    k, v = _values((1, 2, 30, 32), dtype, 6), _values((1, 2, 30, 32), dtype, 7)
    plain = numerics.attention(q, k, v, torch.ones(1, 1, 2, 30, dtype=torch.bool), None)
    junk_k, junk_v = _values((1, 2, 30, 32), dtype, 8), _values((1, 2, 30, 32), dtype, 9)  # finite: 0 × inf is NaN
    slots = {"before": [30 + i for i in range(7)] + list(range(30)),
             "between": [i // 2 if i % 2 == 0 else 30 + i // 2 for i in range(60)],
             "after": [*range(30), 30, 31, 32],
             "around": [30, 31, *range(15), 32, *range(15, 30), 33, 34]}[where]
    index = torch.tensor(slots)
    keys, values = torch.cat((k, junk_k), 2)[:, :, index], torch.cat((v, junk_v), 2)[:, :, index]
    visible = (index < 30)[None, None, None].expand(1, 1, 2, len(slots))
    got = numerics.attention(q, keys, values, visible, None)
    _assert_same_bits(got, plain, f"attention with masked keys {where} the visible ones")


def test_the_split_across_threads_changes_no_bit() -> None:
    x, b = _values((1, 96, 1500), torch.float32, 10), _values((1, 1500, 300), torch.float32, 11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fixed_order.tree_matmul(x, b)
        torch.set_num_threads(4)  # more threads than this machine may have: the kernel splits the outputs anyway
        four = fixed_order.tree_matmul(x, b)
    finally:
        torch.set_num_threads(before)
    _assert_same_bits(four, one, "tree_matmul on 4 threads against 1")


def test_kvverify_kernels_python_turns_it_off() -> None:
    script = ("import torch; from kvverify.reference import fixed_order; "
              "print(fixed_order.applies(torch.zeros(2)))")
    environment = {**os.environ, fixed_order.ENV: "Python", "KVVERIFY_BUILD_DIR": str(fixed_order.build_dir())}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False", f"{fixed_order.ENV}=Python: applies() gave {done.stdout!r}"
    with fixed_order.use("python"):
        assert not fixed_order.applies(torch.zeros(2)), "use('python') left the native kernel on"
    assert fixed_order.applies(torch.zeros(2)), "use('python') left the native kernel off after its block"


def test_no_compiler_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("KVVERIFY_BUILD_DIR", str(tmp_path))
    fixed_order._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not fixed_order.applies(torch.zeros(2)), "no compiler, yet the native kernel applies"
            assert not fixed_order.applies(torch.zeros(2))
            x, weight = _values((3, 10), torch.float32, 0), _values((4, 10), torch.float32, 1)
            out = numerics.linear(x, weight)  # the pure-PyTorch path
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "could not be built" in messages[0], f"expected one warning, got {messages}"
    finally:
        monkeypatch.undo()
        fixed_order._library.cache_clear()
    _assert_same_bits(numerics.linear(x, weight), out, "linear, native against the fallback")


@pytest.mark.slow
@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(rows=st.integers(1, 300), n=st.integers(2, 5000), columns=st.integers(1, 300), double=st.booleans(),
       seed=st.integers(0, 9))
def test_tree_matmul_gives_tree_sums_bits_at_production_sizes(rows: int, n: int, columns: int, double: bool,
                                                                seed: int) -> None:
    dtype = torch.float64 if double else torch.float32
    x, weight = _values((rows, n), dtype, seed), _values((columns, n), dtype, seed + 1)
    with fixed_order.use("python"):
        expected = numerics.linear(x, weight)
    _assert_same_bits(numerics.linear(x, weight), expected, f"linear {tuple(x.shape)} @ {tuple(weight.shape)}.T")
