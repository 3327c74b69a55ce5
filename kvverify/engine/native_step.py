"""The strict decode step with its arithmetic in native code: :class:`NativeStep`, what
:class:`~kvverify.engine.strict_decode.StrictDecodeStep` runs for float32, float64 and bfloat16 models where the
native kernels are built.

The Python step spends most of a decode step calling operators, about 60 a layer for a few microseconds of work
each. Here a layer is five native calls (``native/strict_step.cpp``: the attention norm with q, k, v and RoPE; the
shifted scores; the softmax's denominator, the weighted values, the output projection and the residual; the MLP
norm with gate and up; the gated down projection and the residual), with the transcendentals between them left to
torch's own kernels, on buffers of whole SIMD chunks as :func:`~kvverify.reference.numerics.lane_stable` lays them
out (``rsqrt`` of the norms, ``exp`` of the scores, ``silu`` of the gate), and the cache's ``update`` as before.
Every operation is the Python step's, in its order and dtype (a bfloat16 model's products and sums computed in
float32 and rounded to bfloat16, as torch's CPU kernels compute them; the residual stream held in float32 with
bfloat16's values), so the bits are the model's:
``tests/test_strict_decode.py`` checks them. A layer whose cache returns keys the kernels cannot read (a tensor
subclass, keys that require grad) finishes the step in Python, with the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvverify.protocol.cache import KVCache
from kvverify.protocol.config import ModelConfig
from kvverify.reference import fixed_order, numerics

if TYPE_CHECKING:
    from kvverify.engine.strict_decode import StrictDecodeStep

_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}


class NativeStep:
    """``step(tokens (B, 1), cache, start) -> logits (B, vocab)``: ``python_step``'s bits through the native
    kernels. Call it where :meth:`takes` holds."""

    @staticmethod
    def supports(config: ModelConfig) -> bool:
        """A float32, float64 or bfloat16 model on the CPU (float16 decodes in Python)."""
        return config.dtype in _SUFFIX and torch.device(config.device).type == "cpu"

    def __init__(self, python_step: StrictDecodeStep) -> None:
        self.python = python_step
        c = python_step.config
        self.dtype = c.dtype
        self.compute = numerics.compute_dtype(c.dtype)  # the residual stream's, the statistics', the scores'
        self._layer_norm = int(c.norm == "layer")
        self._buffers: dict[str, torch.Tensor] = {}
        self._scale = 1.0 / math.sqrt(c.head_dim)

    def takes(self, tokens: torch.Tensor) -> bool:
        """Whether this step can run: the native kernels on (``KVVERIFY_KERNELS``, :func:`fixed_order.use`) and
        built, tokens on the CPU."""
        return fixed_order.enabled() and tokens.device.type == "cpu" and self._kernels is not None

    @functools.cached_property
    def _kernels(self) -> _Kernels | None:
        library = fixed_order.built()
        return None if library is None else _Kernels(library, _SUFFIX[self.dtype])

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        step, c, kernels = self.python, self.python.config, self._kernels
        assert kernels is not None, "NativeStep called where takes() is False"
        batch, d_model, head_dim = tokens.shape[0], c.d_model, c.head_dim
        n_q, n_kv, eps, threads = c.n_heads, c.n_kv_heads, c.norm_eps, torch.get_num_threads()
        q_width, kv_width = n_q * head_dim, n_kv * head_dim
        width = q_width + 2 * kv_width
        # (B, d_model) in the compute dtype, a copy of this step's own (the model's dtype's values exactly)
        x = step.embed(tokens, start).reshape(batch, d_model).to(self.compute, memory_format=torch.contiguous_format)
        stats = self._buffer("stats", batch)
        _check(kernels.norm_stats(batch, d_model, x.data_ptr(), self._layer_norm, eps, stats.data_ptr(), threads))
        rope = step.rope_at(start)
        cos, sin = (None, None) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr())
        for index, layer in enumerate(step.layers):
            r = self._lane_stable(torch.rsqrt, stats, "r")
            qkv = torch.empty((batch, 1, width), dtype=self.dtype)  # handed to the cache: new every step
            attn_norm = layer.attn_norm
            _check(kernels.norm_linear(
                batch, d_model, x.data_ptr(), r.data_ptr(), attn_norm.weight.data_ptr(), _pointer(attn_norm.bias),
                layer.qkv.data_ptr(), width, qkv.data_ptr(), cos, sin, n_q + n_kv, head_dim, 0, None, threads))
            q = qkv[..., :q_width].reshape(batch, n_q, 1, head_dim)
            k = qkv[..., q_width : q_width + kv_width].reshape(batch, n_kv, 1, head_dim).contiguous()
            v = qkv[..., q_width + kv_width :].reshape(batch, n_kv, 1, head_dim).contiguous()
            keys, values = step.cached(cache, k, v, layer.layer_idx, start)
            if not self._readable(keys, values):  # the rest of the step in Python: the same bits (or its error)
                x3 = step.attend(x.view(batch, 1, d_model).to(self.dtype), q, keys, values, layer)
                return step.layers_from(x3, cache, start, index + 1)
            held = keys.shape[2]
            scores = self._buffer("scores", batch * n_q * held)
            _check(kernels.scores(batch, n_q, keys.shape[1], head_dim, held, qkv.data_ptr(), width, keys.data_ptr(),
                                *keys.stride(), self._scale, scores.data_ptr(), threads))
            weights = self._lane_stable(torch.exp, scores, "weights")
            _check(kernels.attend(batch, n_q, values.shape[1], head_dim, held, weights.data_ptr(), values.data_ptr(),
                                *values.stride(), layer.wo.data_ptr(), d_model, x.data_ptr(), self._layer_norm,
                                eps, stats.data_ptr(), threads))
            r = self._lane_stable(torch.rsqrt, stats, "r")
            d_ff = layer.gate_up.shape[0] // 2
            gate, up = self._buffer("gate", batch * d_ff, self.dtype), self._buffer("up", batch * d_ff)
            mlp_norm = layer.mlp_norm
            _check(kernels.norm_linear(
                batch, d_model, x.data_ptr(), r.data_ptr(), mlp_norm.weight.data_ptr(), _pointer(mlp_norm.bias),
                layer.gate_up.data_ptr(), 2 * d_ff, gate.data_ptr(), None, None, 0, head_dim, d_ff, up.data_ptr(),
                threads))
            gated = self._lane_stable(torch.ops.aten.silu.out, gate, "silu")
            _check(kernels.gated_down(batch, d_ff, gated.data_ptr(), up.data_ptr(), layer.down.data_ptr(), d_model,
                                    x.data_ptr(), self._layer_norm, eps, stats.data_ptr(), threads))
        r = self._lane_stable(torch.rsqrt, stats, "r")
        final, head = step.final_norm, step.lm_head
        vocab = head.shape[0]
        logits = torch.empty((batch, vocab), dtype=self.dtype)
        _check(kernels.norm_linear(batch, d_model, x.data_ptr(), r.data_ptr(), final.weight.data_ptr(),
                                 _pointer(final.bias), head.data_ptr(), vocab, logits.data_ptr(), None, None, 0,
                                 head_dim, 0, None, threads))
        return logits

    def _readable(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        return keys.dtype == self.dtype and values.dtype == self.dtype and fixed_order.applies(keys, values)

    def _buffer(self, name: str, count: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A flat scratch buffer of at least ``count`` elements of ``dtype`` (default: the compute dtype), a whole
        number of lane_stable's chunks long (the padding's values are never read)."""
        dtype = self.compute if dtype is None else dtype
        buffer = self._buffers.get(name)
        size = -(-count // numerics.LANES) * numerics.LANES
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.zeros(size, dtype=dtype)
        return buffer[:size]

    def _lane_stable(self, fn: Callable[..., torch.Tensor], source: torch.Tensor, name: str) -> torch.Tensor:
        """``fn(piece, out=...)`` (``torch.rsqrt``, ``torch.exp``, ``aten.silu.out``) of the whole buffer ``source``
        into the buffer ``name``, a piece of lane_stable's size at a time: every element in a full SIMD chunk, as
        :func:`numerics.lane_stable` computes it."""
        out = self._buffer(name, source.numel(), source.dtype)
        for begin in range(0, source.numel(), numerics.PIECE):
            fn(source[begin : begin + numerics.PIECE], out=out[begin : begin + numerics.PIECE])
        return out


class _Kernels:
    """The step's native functions (``native/strict_step.cpp``) for one dtype."""

    def __init__(self, library: ctypes.CDLL, suffix: str) -> None:
        self.norm_stats = getattr(library, f"kv_step_norm_stats_{suffix}")
        self.norm_linear = getattr(library, f"kv_step_norm_linear_{suffix}")
        self.scores = getattr(library, f"kv_step_scores_{suffix}")
        self.attend = getattr(library, f"kv_step_attend_{suffix}")
        self.gated_down = getattr(library, f"kv_step_gated_down_{suffix}")


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"a native strict decode kernel failed (status {status}: out of memory for its scratch)")

