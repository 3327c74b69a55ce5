"""kvpress' known failures (see :mod:`kvverify.adapters.known_failures`), each with its fixed reproducing example.

- ``kvpress-streaming-llm-sinks-by-tie``: ``StreamingLLMPress`` scores the ``n_sink`` first tokens and the
  window 1, the rest 0, and keeps the ``topk`` of the scores. When fewer tokens are kept than there are sinks
  (a prompt of 5 to 7 tokens at ratio 0.5 with the default 4 sinks) the kept tokens are chosen among tied ones
  by ``torch.topk``'s tie-breaking: of 5 tokens it keeps slots 1 and 3, not the first two, so the oldest token
  (the attention sink the press exists to keep) is dropped. Found by the eviction oracle's
  ``cached_equals_uncached`` and ``continuation`` on ``kvverify.adapters.kvpress:streaming_llm_press_cache``.

No upstream issue was found (searched kvpress' issues for StreamingLLM, n_sink and short contexts).
"""

from __future__ import annotations

import torch

from kvverify.adapters.known_failures import KnownFailure


def streaming_llm_sinks_by_tie() -> str | None:
    """``StreamingLLMPress(0.5, n_sink=4)`` on 5 tokens keeps 2: they must be the first two, slots 0 and 1."""
    from kvverify.adapters.kvpress import AttentionLayer, HeadCounts, import_kvpress

    press = import_kvpress().StreamingLLMPress(compression_ratio=0.5, n_sink=4)
    module = AttentionLayer(0, 8, HeadCounts(1, 1, 8))
    keys = torch.randn(1, 1, 5, 8, generator=torch.Generator().manual_seed(0))  # (B, Hkv, 5 tokens, D)
    slots = torch.arange(5, dtype=torch.float64)[None, None, :, None].expand(1, 1, 5, 8)  # values: their slots
    _, kept = press.compress(module, torch.zeros(1, 5, 8), keys, slots, None, {})
    held = sorted(int(s) for s in kept[0, 0, :, 0])
    return None if held == [0, 1] else f"StreamingLLMPress(0.5, n_sink=4) on 5 tokens kept slots {held}, not [0, 1]"


KNOWN: tuple[KnownFailure, ...] = (
    KnownFailure(
        name="kvpress-streaming-llm-sinks-by-tie",
        library="kvpress",
        versions=("0.5.5", None),
        cache="kvpress-streaming-llm",
        checks=("cached_equals_uncached", "continuation"),
        pattern=r"kept slots .*keeps the first 4 and the newest",
        summary="fewer kept tokens than sinks: which sinks survive is topk's tie-break, not the first ones",
        reproduce=streaming_llm_sinks_by_tie,
    ),
)
