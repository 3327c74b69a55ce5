"""The transformers bridge: the only place transformers is imported.

- :mod:`~kvverify.adapters.hf.caches`: the registry of transformers' cache classes, :data:`CACHES` (read by
  ``verify-hf``, ``profile`` and ``mutants``), and each as a target: ``kvverify verify
  kvverify.adapters.hf:static_cache``;
- :mod:`~kvverify.adapters.hf.models`: tiny random-weight transformers models;
- :mod:`~kvverify.adapters.hf.llama`: the reference weights in ``LlamaForCausalLM``;
- :mod:`~kvverify.adapters.hf.generation`: greedy generation with a transformers model;
- :mod:`~kvverify.adapters.hf.verify`: transformers' models cached against uncached (``kvverify verify-hf``).

``python -m kvverify.adapters.hf`` measures the fp8 cache's logit error on the reference model.
"""

from kvverify.adapters.hf.caches import (
    CACHES,
    FACTORIES,
    FP8_ATOL,
    INT4_ATOL,
    SLIDING_WINDOW,
    NotApplicable,
    TransformersCache,
    dynamic_cache,
    hqq_cache,
    quantized_cache,
    quanto_cache,
    sliding_window_cache,
    static_cache,
    static_sliding_window_cache,
)

__all__ = [
    "CACHES",
    "FACTORIES",
    "FP8_ATOL",
    "INT4_ATOL",
    "SLIDING_WINDOW",
    "NotApplicable",
    "TransformersCache",
    "dynamic_cache",
    "hqq_cache",
    "quantized_cache",
    "quanto_cache",
    "sliding_window_cache",
    "static_cache",
    "static_sliding_window_cache",
]
