"""The ground floor: what a cache author reads and every room of kvverify stands on. It imports only torch.

- :class:`ModelConfig` (:mod:`~kvverify.protocol.config`): the model a cache is built for;
- :class:`KVCache`, :class:`CacheFactory`, :func:`written_slots` and :class:`Unsupported`
  (:mod:`~kvverify.protocol.cache`): what a cache must do, and the slot rule its outputs follow,
  and the crop rule (:func:`resolve_crop`) the suite and the caches share;
- :class:`CacheDeclaration` (:mod:`~kvverify.protocol.declaration`): what a cache says about itself;
- :class:`Quantizer` (:mod:`~kvverify.protocol.quantizers`, :mod:`~kvverify.protocol.rounding`): how a lossy
  cache rounds, so that the suite can replay it bit for bit;
- :class:`Eviction` (:mod:`~kvverify.protocol.eviction`): which tokens a compressing cache keeps.
"""

from __future__ import annotations

from kvverify.protocol.cache import (
    OPTIONAL_METHODS,
    CacheDeclaration,
    CacheFactory,
    KVCache,
    Unsupported,
    capabilities,
    declaration_of,
    resolve_crop,
    written_slots,
)
from kvverify.protocol.config import ConfigError, ModelConfig
from kvverify.protocol.declaration import DeclarationError
from kvverify.protocol.eviction import Eviction, EvictionError
from kvverify.protocol.quantizers import INT8_PER_TOKEN, KIVI_2, KIVI_4, Quantizer, QuantizerError, kivi
from kvverify.protocol.rounding import Rounding

__all__ = [
    "INT8_PER_TOKEN",
    "KIVI_2",
    "KIVI_4",
    "OPTIONAL_METHODS",
    "CacheDeclaration",
    "CacheFactory",
    "ConfigError",
    "DeclarationError",
    "Eviction",
    "EvictionError",
    "KVCache",
    "ModelConfig",
    "Quantizer",
    "QuantizerError",
    "Rounding",
    "Unsupported",
    "capabilities",
    "declaration_of",
    "kivi",
    "resolve_crop",
    "written_slots",
]
