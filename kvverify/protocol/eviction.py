"""What a cache that keeps a *subset* of its tokens (KV compression: StreamingLLM, Knorm, SnapKV, H2O, kvpress'
presses) declares, so that the suite can check it: ``CacheDeclaration(keeps=Eviction(...))``.

The contract of such a cache, beyond :class:`~kvverify.protocol.cache.KVCache`'s:

- it compresses once, after the first forward (the prefill): that forward's ``update`` returns every token
  (the prefill attends to the whole prompt), and the layer then holds ``n_kept(prompt length)`` of them per
  KV head; tokens written later are all kept;
- ``kept_positions(layer_idx) -> LongTensor (batch, n_kv_heads, S)``: the slot (``cache_position``) of the token
  held in each of the S slots the layer holds now, in the order ``update`` returns them; heads may differ;
- its kept tokens are the recomputed keys and values of those positions, bit for bit, with their *original*
  positions (RoPE angles of the original positions: no rerotation);
- ``get_seq_length()`` is the number of tokens *seen*, not kept, as for a sliding window: the position the next
  token gets. A cache that reports the kept count makes a decoder deriving positions from it (transformers'
  ``cache_position``) rotate the next token at the wrong position;
- ``rule`` says which tokens are kept, where the suite can recompute it from the keys: ``"sinks_window"`` the
  first ``n_sink`` and the newest ones (StreamingLLM), ``"smallest_key_norm"`` the smallest L2 key norms per
  head (Knorm); ``"count"`` only their number (SnapKV, KeyDiff, random...).

>>> Eviction("smallest_key_norm", 0.5).n_kept(12)
6
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: The rules the suite can check, from the recomputed keys, or by count only.
RULES: tuple[str, ...] = ("sinks_window", "smallest_key_norm", "count")


class EvictionError(ValueError):
    """An :class:`Eviction` built with a wrong value; the message names the field, what came and what is expected."""


@dataclass(frozen=True)
class Eviction:
    """rule: which tokens are kept (:data:`RULES`); compression_ratio: the fraction of the prefill's tokens
    removed, in [0, 1); n_sink: the first tokens always kept (``"sinks_window"`` only)."""

    rule: Literal["sinks_window", "smallest_key_norm", "count"]
    compression_ratio: float
    n_sink: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise EvictionError(f"Eviction.rule is {self.rule!r}; expected one of {', '.join(map(repr, RULES))}.")
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0 <= ratio < 1:
            raise EvictionError(f"Eviction.compression_ratio is {ratio!r}; expected a number in [0, 1) (the "
                                "fraction of the prefill's tokens removed), e.g. 0.5.")
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise EvictionError(f"Eviction.n_sink is {self.n_sink!r}; expected an int >= 0 (the first tokens always "
                                "kept).")
        if self.n_sink and self.rule != "sinks_window":
            raise EvictionError(f"Eviction.n_sink is {self.n_sink} with rule {self.rule!r}; sinks belong to "
                                "rule 'sinks_window' only: leave n_sink at 0.")

    def n_kept(self, prefill: int) -> int:
        """Tokens kept per KV head after a prefill of ``prefill`` tokens: ``max(1, int(prefill * (1 - ratio)))``
        (kvpress' ``compute_n_kept``, the same float expression), all of them for a ratio of 0."""
        if self.compression_ratio == 0:
            return prefill
        return min(prefill, max(1, int(prefill * (1 - self.compression_ratio))))
