"""transformers' cache classes as kvverify targets: ``kvverify verify kvverify.adapters.hf:static_cache``.

Each factory takes a :class:`~kvverify.ModelConfig` and returns a fresh, unmodified transformers cache object,
built the transformers v5 way: from a model config whose layer types decide the cache layers
(full attention gives ``DynamicLayer``/``StaticLayer``, a sliding window gives the sliding-window layers).
The config is a minimal stand-in of the reference model's shape: caches read only layer count and types.

- ``dynamic_cache``: ``DynamicCache(config)``, a concatenating ``DynamicLayer`` per layer. Exact.
- ``static_cache``: ``StaticCache(config, max_seq_len)``, a preallocated ``StaticLayer`` per layer. Exact.
- ``sliding_window_cache``: ``DynamicCache`` of ``DynamicSlidingWindowLayer``. Exact; declares its window.
- ``static_sliding_window_cache``: ``StaticCache`` of ``StaticSlidingWindowLayer`` (generate's former
  "sliding_window" and "hybrid" caches). Exact; declares its window.
- ``quantized_cache``: ``QuantizedCache("fp8")``, float8_e4m3fn with a per-tensor scale. Lossy: ``FP8_ATOL``.
- ``quanto_cache``, ``hqq_cache``: ``QuantizedCache("quanto" | "hqq")``, 4-bit group-wise; they need the
  optimum-quanto or hqq package. Lossy: ``INT4_ATOL``.

Where transformers 5.24 departs from the protocol: ``StaticCache.get_seq_length()`` returns a 0-d long
tensor once written; ``crop`` takes only a negative count (a positive length raises ValueError or
RuntimeError); the sliding-window layers refuse to crop once past the window, except the static one, which
crops silently and wrongly (its ``is_croppable`` is False); the fp8 cache's ``crop`` raises IndexError.
"""

from __future__ import annotations

from typing import Any

from kvverify.adapters import INSTALL_HINT, import_transformers
from kvverify.protocol import CacheDeclaration, KVCache
from kvverify.reference.config import ModelConfig

#: The window the sliding-window factories declare, so the suite builds models with it: small, so that
#: generations run well past it.
SLIDING_WINDOW = 6

#: Logit tolerance of the fp8 cache (float8_e4m3fn, one scale per tensor frozen at the first update: about
#: 2^-4 relative error per key and value). ``python -m kvverify.adapters.hf`` measures the largest
#: cached/uncached logit difference (up to each row's first differing token) over 288 tiny reference models
#: of three rows each (MHA/GQA/MQA, four positional schemes, with and without a window, float32/64,
#: strict/fast): 0.46, median 0.11, for logits of magnitude about 4. It does not grow with length (0.18 at
#: most over 100 tokens), so 1.0 leaves a 2x margin.
FP8_ATOL = 1.0

#: Logit tolerance declared for the 4-bit group-wise backends (quanto, hqq): not measured here, as neither
#: package is installed; 4 bits per value are 16x coarser than fp8's 3-bit mantissa in the worst case.
INT4_ATOL = 2.0


def _cache_config(config: ModelConfig, sliding_window: int | None) -> Any:
    """A transformers model config with the reference's layer count and head shape; Mistral's when a window
    is wanted, since Llama's layers are all full attention."""
    transformers = import_transformers()
    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_heads * config.head_dim,  # a multiple of n_heads, as transformers checks
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if sliding_window is None:
        return transformers.LlamaConfig(**fields)
    return transformers.MistralConfig(sliding_window=sliding_window, **fields)


def _window_of(config: ModelConfig) -> int:
    """The model's window, or the declared SLIDING_WINDOW for a model without one (the suite builds models
    with the declared window; a probe config may have none)."""
    return SLIDING_WINDOW if config.sliding_window is None else config.sliding_window


def _declare(cache: Any, declaration: CacheDeclaration) -> KVCache:
    cache.kvverify_declaration = declaration
    result: KVCache = cache
    return result


def dynamic_cache(config: ModelConfig) -> KVCache:
    """``transformers.DynamicCache``: one concatenating ``DynamicLayer`` per layer."""
    return import_transformers().DynamicCache(config=_cache_config(config, None))  # type: ignore[no-any-return]


def static_cache(config: ModelConfig) -> KVCache:
    """``transformers.StaticCache`` of ``config.max_seq_len`` slots per layer, allocated on the first update
    for its batch; it returns the whole buffer and the model masks the unwritten tail."""
    transformers = import_transformers()
    cache = transformers.StaticCache(config=_cache_config(config, None), max_cache_len=config.max_seq_len)
    return cache  # type: ignore[no-any-return]


def sliding_window_cache(config: ModelConfig) -> KVCache:
    """``transformers.DynamicCache`` of ``DynamicSlidingWindowLayer``: keeps the newest W-1 tokens and returns
    them with the new ones. The window W is ``config.sliding_window``, else the declared ``SLIDING_WINDOW``."""
    window = _window_of(config)
    cache = import_transformers().DynamicCache(config=_cache_config(config, window))
    return _declare(cache, CacheDeclaration(sliding_window=window))


def static_sliding_window_cache(config: ModelConfig) -> KVCache:
    """``transformers.StaticCache`` of ``StaticSlidingWindowLayer`` (generate's former "sliding_window" and
    "hybrid" caches): a buffer of ``min(W, max_seq_len)`` slots, rolled once full. W as for
    :func:`sliding_window_cache`."""
    window = _window_of(config)
    transformers = import_transformers()
    cache = transformers.StaticCache(config=_cache_config(config, window), max_cache_len=config.max_seq_len)
    return _declare(cache, CacheDeclaration(sliding_window=window))


def _quantized(config: ModelConfig, backend: str, atol: float, package: str | None) -> KVCache:
    transformers = import_transformers()
    try:
        cache = transformers.QuantizedCache(backend, _cache_config(config, None))
    except ImportError as error:
        raise ImportError(
            f"transformers' QuantizedCache backend {backend!r} needs the {package} package, which is not "
            f"installed; run: pip install {package} (and {INSTALL_HINT}). The 'fp8' backend "
            "(kvverify.adapters.hf:quantized_cache) needs nothing extra."
        ) from error
    return _declare(cache, CacheDeclaration(lossy_atol=atol))


def quantized_cache(config: ModelConfig) -> KVCache:
    """``transformers.QuantizedCache(backend="fp8")``: keys and values stored as float8_e4m3fn with one scale
    per tensor, calibrated on the first update (the prefill, which itself attends to unquantized states).
    Lossy: declares ``lossy_atol=FP8_ATOL``. Needs no package beyond transformers and torch."""
    return _quantized(config, "fp8", FP8_ATOL, None)


def quanto_cache(config: ModelConfig) -> KVCache:
    """``QuantizedCache(backend="quanto")``: 4-bit group-wise; needs ``optimum-quanto``."""
    return _quantized(config, "quanto", INT4_ATOL, "optimum-quanto")


def hqq_cache(config: ModelConfig) -> KVCache:
    """``QuantizedCache(backend="hqq")``: 4-bit group-wise; needs ``hqq``."""
    return _quantized(config, "hqq", INT4_ATOL, "hqq")


sliding_window_cache.kvverify_declaration = CacheDeclaration(sliding_window=SLIDING_WINDOW)  # type: ignore[attr-defined]
static_sliding_window_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    sliding_window=SLIDING_WINDOW
)
quantized_cache.kvverify_declaration = CacheDeclaration(lossy_atol=FP8_ATOL)  # type: ignore[attr-defined]
quanto_cache.kvverify_declaration = CacheDeclaration(lossy_atol=INT4_ATOL)  # type: ignore[attr-defined]
hqq_cache.kvverify_declaration = CacheDeclaration(lossy_atol=INT4_ATOL)  # type: ignore[attr-defined]

#: Factories by short name (the names ``kvverify verify-hf`` and tests use).
FACTORIES = {
    "dynamic": dynamic_cache,
    "static": static_cache,
    "sliding": sliding_window_cache,
    "static-sliding": static_sliding_window_cache,
    "fp8": quantized_cache,
    "quanto": quanto_cache,
    "hqq": hqq_cache,
}


def measure_lossy_error(factory: Any, *, seeds: int = 3, new_tokens: int = 24) -> tuple[float, float]:
    """The largest and the median cached/uncached logit difference of a lossy cache factory over tiny
    reference models of every shape the suite draws, each row compared up to its first differing token."""
    import itertools
    import statistics

    import torch

    from kvverify.reference.model import ReferenceModel

    errors: list[float] = []
    shapes = itertools.product(
        (4, 2, 1), (None, 5), ("rope", "alibi", "learned", "none"), (torch.float32, torch.float64),
        ("strict", "fast"), range(seeds),
    )
    for n_kv_heads, window, positional, dtype, numerics, seed in shapes:
        config = ModelConfig.preset(
            "tiny", n_kv_heads=n_kv_heads, sliding_window=window, positional=positional, dtype=dtype,
            numerics=numerics, max_seq_len=64,
        )
        model = ReferenceModel(config, seed=seed)
        prompt = torch.randint(0, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(prompt)
        mask[1, :2], mask[2, :5] = 0, 0  # left padding
        ref = model.generate(prompt, new_tokens, use_cache=False, attention_mask=mask)
        out = model.generate(prompt, new_tokens, cache=factory(config), attention_mask=mask)
        for row in range(prompt.shape[0]):
            differ = (out.tokens[row] != ref.tokens[row]).nonzero()
            last = int(differ[0]) if len(differ) else new_tokens - 1
            errors.append(float((out.logits[row, : last + 1] - ref.logits[row, : last + 1]).abs().max()))
    return max(errors), statistics.median(errors)


if __name__ == "__main__":
    worst, median = measure_lossy_error(quantized_cache)
    print(f"fp8 QuantizedCache: max logit difference {worst:.3g}, median {median:.3g}; declared FP8_ATOL={FP8_ATOL}")
