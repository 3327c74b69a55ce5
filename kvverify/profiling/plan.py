"""What a profile run measures: presets and lengths, repetitions, and the caches to profile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvverify.adapters.hf import CACHES
from kvverify.caches import BUILTIN_CACHES
from kvverify.profiling.analysis import Layout
from kvverify.protocol.config import ModelConfig


@dataclass(frozen=True)
class CacheSpec:
    """A cache to profile. ``windowed`` caches run with a model of ``Plan.window``; ``transformers`` caches are
    timed inside ``LlamaForCausalLM`` (same weights) rather than the reference model."""

    name: str
    make: Callable[[ModelConfig], Any]
    layout: Layout | None  # None: an outside target whose layout is unknown; only the formula is compared
    windowed: bool = False
    transformers: bool = False


@dataclass(frozen=True)
class Plan:
    presets: dict[str, tuple[int, ...]]  # preset name -> lengths; the first preset also gets the time ratio
    steps: int  # cached decode steps timed at each length (median)
    repeats: int  # uncached forwards timed at each length (median)
    ratio_rounds: int  # alternating rounds of reference vs transformers
    ratio_tokens: int  # tokens generated per round
    prompt: int = 16
    window: int = 256  # the sliding cache's window (capped at half a preset's max_seq_len)
    device: str = "cpu"
    engine: str = "eager"  # the reference's decode engine in the ratio rows (kvverify.profiling.engines.ENGINES)

    def window_for(self, config: ModelConfig) -> int:
        return max(2, min(self.window, config.max_seq_len // 2))


QUICK = Plan(presets={"bench": (64, 256, 512)}, steps=4, repeats=2, ratio_rounds=5, ratio_tokens=48)
FULL = Plan(
    presets={"bench": (64, 128, 256, 512, 1024, 2048), "tiny": (16, 32, 64, 120)},
    steps=8,
    repeats=3,
    ratio_rounds=9,
    ratio_tokens=128,
)

#: The analysis layout of each built-in cache.
BUILTIN_LAYOUTS: dict[str, Layout] = {
    "contiguous": "exact",
    "static": "preallocated",
    "paged": "paged",
    "sliding": "window",
}


def builtin_specs() -> list[CacheSpec]:
    return [
        CacheSpec(name, factory, BUILTIN_LAYOUTS.get(name), windowed=name == "sliding")
        for name, factory in BUILTIN_CACHES.items()
    ]


#: transformers' caches profiled beside the built-in ones: report name -> (name in kvverify.adapters.hf.CACHES,
#: analysis layout).
TRANSFORMERS_CACHES: dict[str, tuple[str, Layout]] = {
    "hf-dynamic": ("dynamic", "exact"),
    "hf-static": ("static", "preallocated-rows"),
}


def transformers_specs() -> list[CacheSpec]:
    """transformers' DynamicCache and StaticCache, the targets of their kvverify.adapters.hf registry entries."""
    specs = []
    for name, (entry, layout) in TRANSFORMERS_CACHES.items():
        factory = CACHES[entry].target
        assert factory is not None, f"kvverify.adapters.hf.CACHES[{entry!r}] has no target to profile"
        specs.append(CacheSpec(name, factory, layout, transformers=True))
    return specs
