"""transformers' cache classes: the one registry, :data:`CACHES`, that ``verify-hf``, ``profile`` and ``mutants`` read.

Each :class:`TransformersCache` builds one of transformers' cache classes in two ways and states its tolerance:

- ``for_model(config, max_cache_len)``: for a transformers model of that config (``kvverify verify-hf``); raises
  :class:`NotApplicable`, saying why, where the class does not apply to that model here;
- ``target(config)``: for the reference model, as a kvverify target ``FACTORY(ModelConfig)``
  (``kvverify verify kvverify.adapters.hf:static_cache``); None where there is none (offloading);
- ``atol``: the logit tolerance of a lossy cache; None for an exact one.

The targets build the transformers v5 way, from a minimal transformers config of the reference model's shape
(caches read only the layer count and types): full attention gives ``DynamicLayer``/``StaticLayer``, a
sliding window the sliding-window layers.

- ``dynamic_cache``: ``DynamicCache(config)``, a concatenating ``DynamicLayer`` per layer. Exact.
- ``static_cache``: ``StaticCache(config, max_seq_len)``, a preallocated ``StaticLayer`` per layer. Exact.
- ``sliding_window_cache``: ``DynamicCache`` of ``DynamicSlidingWindowLayer``. Exact; declares its window.
- ``static_sliding_window_cache``: ``StaticCache`` of ``StaticSlidingWindowLayer`` (generate's former
  "sliding_window" and "hybrid" caches). Exact; declares its window.
- ``quantized_cache``: ``QuantizedCache("fp8")``, float8_e4m3fn with a per-tensor scale. Lossy: ``FP8_ATOL``;
  declares its quantizer (``FP8_QUANTIZER``), so ``cached_equals_uncached`` replays it bit for bit.
- ``quanto_cache``, ``hqq_cache``: ``QuantizedCache("quanto" | "hqq")``, 4-bit, one group per token and head
  (``q_group_size=head_dim``), residual ``RESIDUAL_LENGTH``; they need the optimum-quanto or hqq package.
  Lossy: ``INT4_ATOL``.

Where transformers 5.24 departs from the protocol: ``StaticCache.get_seq_length()`` returns a 0-d long
tensor once written; ``crop`` takes only a negative count (a positive length raises ValueError or
RuntimeError); the sliding-window layers refuse to crop once past the window, except the static one, which
crops silently and wrongly (its ``is_croppable`` is False); the fp8 cache's ``crop`` raises IndexError.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.adapters import INSTALL_HINT, import_transformers
from kvverify.protocol.cache import CacheDeclaration, CacheFactory, KVCache
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.quantizers import Quantizer
from kvverify.reference.inputs import register_layout_reader

#: The window the sliding-window targets declare, so the suite builds models with it: small, so that
#: generations run well past it.
SLIDING_WINDOW = 6

#: Logit tolerance of the fp8 cache (float8_e4m3fn, one scale per tensor frozen at the first update: about
#: 2^-4 relative error per key and value), on transformers' models and on the reference model alike. The
#: largest difference measured is 2.0, on the tiny transformers models of ``kvverify verify-hf --caches fp8
#: --seed N`` for N in 0..7 (llama, qwen2 and gpt2; logits of magnitude up to about 8; median 0.7); the
#: reference model's tiny presets give at most 0.46 (``python -m kvverify.adapters.hf``: 288 models, logits
#: of magnitude about 4). 4.0 leaves a 2x margin over the largest.
FP8_ATOL = 4.0

#: The fp8 backend's quantizer, declared so that ``cached_equals_uncached`` compares it with the reference run
#: through the same loss (:mod:`kvverify.checks.replay`): bit for bit, as the replay reproduces transformers'
#: arithmetic exactly (36 of 36 generations bitwise equal, float32/float64/bfloat16, strict and fast numerics).
FP8_QUANTIZER = Quantizer(kind="fp8", scheme="append")

#: Logit tolerance declared for the 4-bit group-wise backends (quanto, hqq), with one group per token and head
#: (q_group_size=head_dim). A first measurement (one reference model per head_dim, 2 rows, 20 new tokens, residual
#: 4) gave at most 8.3e-7 / 1.1e-6 at head_dim 2, 0.074 / 0.13 at head_dim 4 and 3.96 / 4.14 at head_dim 8
#: (quanto / hqq; greedy tokens differ at head_dim 8). 8.0 leaves about 2x over the largest; the wider measurement
#: is ``python -m kvverify.adapters.hf quanto`` (and ``hqq``).
INT4_ATOL = 8.0
#: Newest tokens the group-wise backends keep in full precision (transformers' default is 128, longer than the
#: suite's sequences).
RESIDUAL_LENGTH = 8


class NotApplicable(Exception):
    """This cache does not apply to this model here; the message says why."""


#: for_model(transformers config, max_cache_len) -> a cache for a transformers model of that config
ModelCacheBuilder = Callable[[Any, int], Any]


@dataclass(frozen=True)
class TransformersCache:
    """One of transformers' cache classes: what it is, how to build it for either model, and its tolerance."""

    name: str  # the short name: `kvverify verify-hf --caches NAME`, FACTORIES[NAME]
    what: str  # what for_model builds, in one line
    for_model: ModelCacheBuilder  # raises NotApplicable where the class does not apply to the model
    target: CacheFactory | None = None  # FACTORY(ModelConfig) for the reference model; None: not offered
    atol: float | None = None  # logit tolerance of a lossy cache; None: exact


# -- for the reference model: kvverify targets FACTORY(ModelConfig) ------------------------------------------------


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
    # the group-wise backends: one group per token and head (q_group_size=head_dim, which quanto needs to divide
    # what it groups; its default 64 exceeds the suite's head dims), and a short residual, so that generations
    # run through several re-quantizations
    group_wise = {} if package is None else dict(nbits=4, q_group_size=config.head_dim,
                                                  residual_length=RESIDUAL_LENGTH)
    try:
        cache = transformers.QuantizedCache(backend, _cache_config(config, None), **group_wise)
    except ImportError as error:
        raise ImportError(
            f"transformers' QuantizedCache backend {backend!r} needs the {package} package, which is not "
            f"installed; run: pip install {package} (and {INSTALL_HINT}). The 'fp8' backend "
            "(kvverify.adapters.hf:quantized_cache) needs nothing extra."
        ) from error
    return _declare(cache, CacheDeclaration(lossy_atol=atol, quantizer=FP8_QUANTIZER if package is None else None))


def quantized_cache(config: ModelConfig) -> KVCache:
    """``transformers.QuantizedCache(backend="fp8")``: keys and values stored as float8_e4m3fn with one scale
    per tensor, calibrated on the first update (the prefill, which itself attends to unquantized states).
    Lossy: declares ``lossy_atol=FP8_ATOL``. Needs no package beyond transformers and torch."""
    return _quantized(config, "fp8", FP8_ATOL, None)


def quanto_cache(config: ModelConfig) -> KVCache:
    """``QuantizedCache(backend="quanto")``: 4-bit group-wise; needs ``optimum-quanto``."""
    return _quantized(config, "quanto", INT4_ATOL, "optimum-quanto")


def build_quanto_extension() -> None:
    """Build optimum-quanto's C++ extension now: quanto compiles it on first use (tens of seconds, minutes on a
    loaded machine), which inside an example passes its time limit and, killed, leaves a broken build behind."""
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if is_extension_available("quanto_cpp"):
        _ = get_extension("quanto_cpp").lib  # the property builds and loads it


def hqq_cache(config: ModelConfig) -> KVCache:
    """``QuantizedCache(backend="hqq")``: 4-bit group-wise; needs ``hqq``."""
    return _quantized(config, "hqq", INT4_ATOL, "hqq")


sliding_window_cache.kvverify_declaration = CacheDeclaration(sliding_window=SLIDING_WINDOW)  # type: ignore[attr-defined]
static_sliding_window_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    sliding_window=SLIDING_WINDOW
)
quantized_cache.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
    lossy_atol=FP8_ATOL, quantizer=FP8_QUANTIZER)
quanto_cache.kvverify_declaration = CacheDeclaration(lossy_atol=INT4_ATOL)  # type: ignore[attr-defined]
hqq_cache.kvverify_declaration = CacheDeclaration(lossy_atol=INT4_ATOL)  # type: ignore[attr-defined]


# -- for a transformers model: builder(config, max_cache_len) ------------------------------------------------------


def has_window(config: Any) -> bool:
    """Whether some layer of a transformers model config is sliding-window attention."""
    layer_types, _ = import_transformers("cache_utils").get_layer_types_and_kwargs(config)
    return "sliding_attention" in layer_types


def _dynamic(config: Any, length: int) -> Any:
    return import_transformers().DynamicCache()


def _full_static(config: Any, length: int) -> Any:
    cache_utils = import_transformers("cache_utils")
    return cache_utils.Cache(layers=[cache_utils.StaticLayer(max_cache_len=length)
                                     for _ in range(config.num_hidden_layers)])


def _sliding(config: Any, length: int) -> Any:
    return import_transformers().DynamicCache(config=config)


def _hybrid(config: Any, length: int) -> Any:
    return import_transformers().StaticCache(config=config, max_cache_len=length)


def _windowed(build: ModelCacheBuilder) -> ModelCacheBuilder:
    def builder(config: Any, length: int) -> Any:
        if not has_window(config):
            raise NotApplicable("no sliding-window layers in this model (see dynamic/static)")
        return build(config, length)

    return builder


def _quantized_for_model(backend: str, package: str) -> ModelCacheBuilder:
    def builder(config: Any, length: int) -> Any:
        try:
            return import_transformers().QuantizedCache(backend, config)
        except ImportError as error:
            raise NotApplicable(f"needs {package}, not installed (pip install {package})") from error
        except ValueError as error:  # transformers refuses sliding-window layers
            raise NotApplicable("QuantizedCache takes full-attention layers only") from error

    return builder


def _offloaded(static: bool) -> ModelCacheBuilder:
    def builder(config: Any, length: int) -> Any:
        if not torch.cuda.is_available():
            raise NotApplicable("offloading needs CUDA (it prefetches on CUDA streams)")
        transformers = import_transformers()
        if static:
            return transformers.StaticCache(config=config, max_cache_len=length, offloading=True)
        return transformers.DynamicCache(config=config, offloading=True)

    return builder


#: transformers' caches by short name, in the order verify-hf lists them.
CACHES: dict[str, TransformersCache] = {
    entry.name: entry
    for entry in (
        TransformersCache("dynamic", "DynamicCache(): DynamicLayer on every layer", _dynamic, dynamic_cache),
        TransformersCache("static", "StaticLayer on every layer (the model masks any window)", _full_static,
                          static_cache),
        TransformersCache("sliding", "DynamicCache(config): DynamicSlidingWindowLayer on windowed layers",
                          _windowed(_sliding), sliding_window_cache),
        TransformersCache("hybrid", "StaticCache(config): StaticSlidingWindowLayer on windowed layers",
                          _windowed(_hybrid), static_sliding_window_cache),
        TransformersCache("fp8", "QuantizedCache('fp8'): float8_e4m3fn, lossy", _quantized_for_model("fp8", ""),
                          quantized_cache, FP8_ATOL),
        TransformersCache("quanto", "QuantizedCache('quanto'): 4-bit, lossy",
                          _quantized_for_model("quanto", "optimum-quanto"), quanto_cache, INT4_ATOL),
        TransformersCache("hqq", "QuantizedCache('hqq'): 4-bit, lossy", _quantized_for_model("hqq", "hqq"),
                          hqq_cache, INT4_ATOL),
        TransformersCache("offloaded", "DynamicCache(offloading=True)", _offloaded(static=False)),
        TransformersCache("offloaded-static", "StaticCache(offloading=True)", _offloaded(static=True)),
    )
}

#: The targets of :data:`CACHES` by short name: the caches a kvverify target can name.
FACTORIES: dict[str, CacheFactory] = {name: entry.target for name, entry in CACHES.items() if entry.target}


def _is_transformers_cache(cache: object) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers cache exists only once transformers is imported
    return transformers is not None and isinstance(cache, transformers.Cache) and isinstance(
        getattr(cache, "layers", None), list)


def _held(cache: object) -> list[tuple[object, object]]:
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]  # type: ignore[attr-defined]


#: transformers' caches may keep a layer in another dtype (quantized) or on another device (offloaded): read for
#: their shapes only.
register_layout_reader(_is_transformers_cache, _held, exact=False)
