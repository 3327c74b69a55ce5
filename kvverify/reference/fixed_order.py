"""The native fixed-order kernels: ``tree_matmul`` for strict numerics, products summed by
:func:`kvverify.reference.numerics.tree_sum`'s halving tree, and ``ordered_matmul`` for the batch-invariant mode,
products summed left to right (:mod:`kvverify.invariant.ordered`); bit for bit, vectorised across outputs like a
GEMM.

``native/strict_step.cpp`` (the strict decode step's arithmetic between its transcendentals,
:mod:`kvverify.engine.native_step`) is built into the same library. ``native/*.cpp`` are compiled just in time
with the machine's C++ compiler (``$CXX``, else ``c++``; ``-O3 -march=native -ffp-contract=off``, no fused
multiply-add, no ``-ffast-math``) into a per-user cache
(``$KVVERIFY_BUILD_DIR``, else ``$XDG_CACHE_HOME/kvverify/kernels``, else ``~/.cache/kvverify/kernels``), keyed by
the source, the compiler, the flags and the CPU, and loaded with ctypes: no build step at install, no CUDA torch in
a build environment, no torch headers. Where it cannot be built (no compiler), strict numerics keeps its
pure-PyTorch path, which gives the same bits, with one warning. ``KVVERIFY_KERNELS=python`` forces that path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: ``KVVERIFY_KERNELS=python`` turns the native kernel off (``native``, the default, uses it where it is built).
ENV = "KVVERIFY_KERNELS"
NATIVE = Path(__file__).parent / "native"
#: Compiled together into one library; common.h is hashed into the build key with them.
SOURCES = (NATIVE / "tree_matmul.cpp", NATIVE / "ordered_matmul.cpp", NATIVE / "strict_step.cpp")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-fPIC", "-shared", "-pthread")
#: Tried first; dropped for compilers or CPUs that refuse it.
NATIVE_ARCH = "-march=native"

#: Tensor types whose memory the kernel may read (not fake, functional or other subclasses).
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SYMBOLS = {torch.float32: "kv_tree_matmul_f32", torch.float64: "kv_tree_matmul_f64"}
_ORDERED_SYMBOLS = {torch.float32: "kv_ordered_matmul_f32", torch.float64: "kv_ordered_matmul_f64"}


#: "native" or "python": $KVVERIFY_KERNELS, read at the first strict sum (a decode step asks dozens of times), or
#: what :func:`use` set.
_mode: str | None = None


def enabled() -> bool:
    """Whether strict numerics may use the native kernel."""
    global _mode
    if _mode is None:
        _mode = "python" if os.environ.get(ENV, "native").strip().lower() == "python" else "native"
    return _mode == "native"


@contextmanager
def use(kernels: str) -> Iterator[None]:
    """Strict numerics runs ``"native"`` or ``"python"`` kernels within the block, as ``KVVERIFY_KERNELS`` sets for
    a process (the same bits either way)."""
    global _mode
    if kernels not in ("native", "python"):
        raise ValueError(f"kernels are 'native' or 'python'; got {kernels!r}")
    enabled()
    before, _mode = _mode, kernels
    try:
        yield
    finally:
        _mode = before


def applies(*tensors: torch.Tensor) -> bool:
    """Whether :func:`tree_matmul` can take these tensors (once cast to the compute dtype): the kernel is on and
    built, and every tensor is a plain strided CPU tensor outside autograd and outside a compiler's trace."""
    if not enabled() or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) not in _PLAIN or not t.is_cpu or t.layout != torch.strided:
            return False
        if not t.dtype.is_floating_point or (grad and t.requires_grad):
            return False
    return _library() is not None


def tree_matmul(x: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``out[g, r, o] = tree_sum(x[g, r, :] * b[g, :, o])``, bit for bit, each product rounded to the dtype first.

    x: (G, R, n), b: (G, n, N), one dtype (float32 or float64), any strides (a zero stride broadcasts) ->
    (G, R, N) contiguous. ``rows`` (G, n) int64, a permutation of 0..n-1 per group, when given: term k of group g
    reads b's row ``rows[g, k]`` (keys in each query's own order, without a gathered copy). Call it where
    :func:`applies` holds."""
    groups, count, n = _check(x, b, "tree_matmul")
    if rows is not None and (rows.dtype != torch.int64 or rows.shape != (groups, n)):
        raise ValueError(f"tree_matmul's rows are int64 (G, n) = {(groups, n)}; got {rows.dtype} {tuple(rows.shape)}")
    if n < 2:  # no tree: the one product, or an empty sum
        return (x[:, :, :1] * b[:, :1, :]) if n else x.new_zeros(groups, count, b.shape[2])
    index = (None, 0, 0) if rows is None else (rows.data_ptr(), rows.stride(0), rows.stride(1))
    return _call(_SYMBOLS[x.dtype], x, b, *index)


def ordered_matmul(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[g, r, o] = (((+0 + p_0) + p_1) + ...) + p_{n-1}`` with ``p_k = x[g, r, k] * b[g, k, o]`` rounded to
    the dtype: the batch-invariant mode's left-to-right sum (:func:`kvverify.invariant.ordered.matmul`), bit for
    bit. Shapes and dtypes as :func:`tree_matmul`."""
    _check(x, b, "ordered_matmul")
    return _call(_ORDERED_SYMBOLS[x.dtype], x, b)


def _check(x: torch.Tensor, b: torch.Tensor, name: str) -> tuple[int, int, int]:
    if x.dim() != 3 or b.dim() != 3 or x.shape[0] != b.shape[0] or x.shape[2] != b.shape[1]:
        raise ValueError(f"{name} expects x (G, R, n) and b (G, n, N); got {tuple(x.shape)}, {tuple(b.shape)}")
    if x.dtype != b.dtype or x.dtype not in _SYMBOLS:
        raise ValueError(f"{name} takes float32 or float64, one dtype for both; got {x.dtype}, {b.dtype}")
    return x.shape[0], x.shape[1], x.shape[2]


def _call(symbol: str, x: torch.Tensor, b: torch.Tensor, *index: int | None) -> torch.Tensor:
    groups, rows, n = x.shape
    columns = b.shape[2]
    out = torch.empty((groups, rows, columns), dtype=x.dtype)
    library = _library()
    assert library is not None, f"{symbol} called where applies() is False"
    status = getattr(library, symbol)(
        groups, rows, n, columns, x.data_ptr(), *x.stride(), b.data_ptr(), *b.stride(),
        out.data_ptr(), *out.stride(), *index, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"the native {symbol} refused x {tuple(x.shape)}, b {tuple(b.shape)} (status {status})")
    return out


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`kvverify.reference.numerics.tree_sum` over ``dim`` of a float32 or float64 tensor, as
    :func:`tree_matmul` of ones against the rows: each product 1 × x is x itself, then the same tree."""
    moved = x if dim in (-1, x.dim() - 1) else x.movedim(dim, -1)
    n = moved.shape[-1]
    rows = moved.reshape(-1, n)  # (R, n)
    return tree_matmul(_ones(n, x.dtype), rows.T[None]).view(moved.shape[:-1])  # rows as outputs


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, n) ones, read (never written) by :func:`tree_sum`: a norm or a softmax asks for the same few."""
    return torch.ones((1, 1, n), dtype=dtype)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (after one warning) where it cannot be built."""
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"kvverify: the native fixed-order kernel could not be built ({error}); strict numerics runs its "
            f"pure-PyTorch path (the same bits, several times slower). Install a C++ compiler (or set CXX), or "
            f"set {ENV}=python to choose that path without this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    operands = [i64] * 4 + [pointer, i64, i64, i64] * 3
    for symbol in _SYMBOLS.values():
        getattr(library, symbol).argtypes = [*operands, pointer, i64, i64, ctypes.c_int]  # and the rows of b
    for symbol in _ORDERED_SYMBOLS.values():
        getattr(library, symbol).argtypes = [*operands, ctypes.c_int]
    for symbol in (*_SYMBOLS.values(), *_ORDERED_SYMBOLS.values()):
        getattr(library, symbol).restype = ctypes.c_int
    _declare_step(library)
    return library


def built() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None where it cannot be built: the strict decode step's
    kernels (``native/strict_step.cpp``, :mod:`kvverify.engine.native_step`) are in it too."""
    return _library()


def _declare_step(library: ctypes.CDLL) -> None:
    """The argument types of ``native/strict_step.cpp``'s functions (sizes int64, scalars double, flags int)."""
    i64, pointer, flag, real = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    signatures = {
        "norm_stats": [i64, i64, pointer, flag, real, pointer, flag],
        "norm_linear": [i64, i64, pointer, pointer, pointer, pointer, pointer, i64, pointer, pointer, pointer, i64,
                        i64, i64, pointer, flag],
        "scores": [i64] * 5 + [pointer, i64, pointer, i64, i64, i64, i64, real, pointer, flag],
        "attend": [i64] * 5 + [pointer, pointer, i64, i64, i64, i64, pointer, i64, pointer, flag, real, pointer,
                               flag],
        "gated_down": [i64, i64, pointer, pointer, pointer, i64, pointer, flag, real, pointer, flag],
    }
    for name, arguments in signatures.items():
        for suffix in ("f32", "f64", "bf16"):
            function = getattr(library, f"kv_step_{name}_{suffix}")
            function.argtypes, function.restype = arguments, ctypes.c_int


def build_dir() -> Path:
    """Where compiled kernels are cached, per user."""
    explicit = os.environ.get("KVVERIFY_BUILD_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kvverify" / "kernels"


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler found (c++, g++ or clang++ on PATH, or $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in ((NATIVE_ARCH, *FLAGS), FLAGS):
        texts = [path.read_text() for path in (*SOURCES, NATIVE / "common.h")]
        key = hashlib.sha256("\0".join([*texts, compiler, version, *flags, _cpu()]).encode()).hexdigest()
        target = directory / f"fixed_order-{key[:20]}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            built = Path(scratch) / target.name
            done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True,
                                  text=True, timeout=600, check=False)
            if done.returncode == 0:
                os.replace(built, target)  # atomic: concurrent builders (pytest-xdist workers) each write whole
                return target
            errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-400:]}")
    raise OSError("; ".join(errors))


def _cpu() -> str:
    """What -march=native compiles for: the CPU's feature flags (a home directory may be shared by machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()
