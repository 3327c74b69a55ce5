"""llama-cpp-python, the one module that imports it: open a context on a GGUF file, and the few calls the checks make.

A context is opened the way the checks need it: ``logits_all=True`` (``Llama.scores`` keeps the logits of every
evaluated position, so each can be compared), a float32 KV cache (``type_k = type_v = GGML_TYPE_F32``: llama.cpp's
default is float16, whose rounding would hide small errors), one thread (so a result does not depend on how the
machine's cores are shared), no flash attention, quiet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kvverify.adapters import import_library
from kvverify.adapters.llamacpp.gguf_export import INSTALL_HINT

#: The release the checks are written against (the changelog's prefix-reuse fixes: #2306, #2108, #2152).
TESTED_VERSION = "0.3.36"


def import_llama_cpp() -> ModuleType:
    """``llama_cpp``, or an ImportError that says what to install."""
    return import_library("llama_cpp", needs="llama-cpp-python", install=INSTALL_HINT)


@dataclass(frozen=True)
class ContextSpec:
    """How a context is opened: the GGUF file, its context length and batch sizes."""

    path: Path
    n_ctx: int = 256
    n_batch: int = 512  # tokens per llama_decode call of Llama.eval
    n_threads: int = 1


def open_context(spec: ContextSpec) -> Any:
    """A fresh ``llama_cpp.Llama`` on ``spec.path``: empty KV cache, every position's logits kept."""
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(spec.path), n_ctx=spec.n_ctx, n_batch=spec.n_batch, n_ubatch=spec.n_batch,
        n_threads=spec.n_threads, n_threads_batch=spec.n_threads, logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False,
    )


def held_tokens(llama: Any) -> list[int]:
    """The tokens the context says it holds (``input_ids[:n_tokens]``)."""
    return [int(t) for t in llama.input_ids[: llama.n_tokens]]


def logits(llama: Any, start: int, stop: int) -> np.ndarray:
    """A copy of the logits of positions ``start .. stop-1``: (stop - start, vocab) float32."""
    return np.array(llama.scores[start:stop], dtype=np.float32, copy=True)


def evaluate(llama: Any, tokens: Sequence[int]) -> None:
    """``Llama.eval``: append ``tokens`` after the ``n_tokens`` the context holds."""
    llama.eval(list(tokens))


def crop(llama: Any, keep: int) -> bool:
    """Keep the first ``keep`` positions: ``llama_memory_seq_rm(mem, -1, keep, -1)`` (what ``kv_cache_seq_rm`` of
    0.3.36's internals calls), then ``n_tokens = keep``, as ``Llama.generate`` itself crops. False when llama.cpp
    refuses the removal."""
    llama_cpp = import_llama_cpp()
    removed = bool(llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llama.ctx), -1, keep, -1))
    if removed:
        llama.n_tokens = keep
    return removed


def save_state(llama: Any) -> Any:
    """``Llama.save_state()``: a ``LlamaState``."""
    return llama.save_state()


def load_state(llama: Any, state: Any) -> None:
    """``Llama.load_state(state)``."""
    llama.load_state(state)


def generate(llama: Any, prompt: Sequence[int], n_new: int) -> list[int]:
    """Greedy ``Llama.generate(prompt)`` (``reset=True``: it reuses the longest prefix the context holds), the first
    ``n_new`` tokens it yields."""
    out: list[int] = []
    if n_new <= 0:
        return out
    for token in llama.generate(list(prompt), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n_new:
            break
    return out


def ram_cache(capacity_bytes: int = 2 << 30) -> Any:
    """A ``llama_cpp.LlamaRAMCache``."""
    return import_llama_cpp().LlamaRAMCache(capacity_bytes=capacity_bytes)


def complete(llama: Any, prompt: Sequence[int], n_new: int) -> None:
    """Greedy ``Llama.create_completion`` of a token-id prompt (through the context's ``LlamaRAMCache``, when one was
    set with ``set_cache``): up to ``n_new`` tokens, stopping early at end of sequence."""
    llama.create_completion(list(prompt), max_tokens=n_new, temperature=0.0, top_k=1, repeat_penalty=1.0)


def version() -> str:
    """The installed llama-cpp-python's version."""
    return str(import_llama_cpp().__version__)


def clear(llama: Any) -> None:
    """Empty the context: ``llama_memory_clear(mem, True)`` and ``Llama.reset()`` (``n_tokens = 0``)."""
    llama_cpp = import_llama_cpp()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama.ctx), True)
    llama.reset()


def memory_positions(llama: Any) -> tuple[int, int]:
    """The smallest and largest position llama.cpp's memory holds for sequence 0 (``llama_memory_seq_pos_min`` /
    ``_max``; -1, -1 when it holds none)."""
    llama_cpp = import_llama_cpp()
    memory = llama_cpp.llama_get_memory(llama.ctx)
    return int(llama_cpp.llama_memory_seq_pos_min(memory, 0)), int(llama_cpp.llama_memory_seq_pos_max(memory, 0))
