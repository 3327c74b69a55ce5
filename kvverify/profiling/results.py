"""What a profile run measured, as plain dataclasses that serialize to results.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CacheRow:
    """One cache at one length: time, memory measured, memory predicted."""

    preset: str
    cache: str
    layout: str | None  # the analysis layout its bytes are predicted with (None for an unknown target)
    window: int | None
    length: int  # tokens in the cache when measured
    prefill_s: float | None  # one forward over `length` prompt tokens, filling the cache
    cached_step_s: float | None  # one decode step with `length` tokens cached
    uncached_step_s: float | None  # one forward over `length` tokens (the same step without a cache)
    held_bytes: int  # storages of the tensors the cache holds after `length` tokens
    formula_bytes: int  # analysis.kv_bytes: what `length` tokens need (window-capped)
    predicted_bytes: int | None  # analysis.predicted_cache_bytes for the layout
    memray_peak_bytes: int  # peak bytes memray saw while the cache was built and took `length` tokens (-1: not tracked)
    churn_bytes: int  # every byte memray saw allocated meanwhile, model excluded (-1: not tracked)
    churn_count: int
    flops_cached: int
    flops_uncached: int
    uncached_peak_estimate_bytes: int  # analysis.uncached_peak_bytes: prefix activations + eager scores

    @property
    def speedup(self) -> float | None:
        if self.cached_step_s is None or self.uncached_step_s is None:
            return None
        return self.uncached_step_s / self.cached_step_s

    @property
    def held_over_formula(self) -> float:
        return self.held_bytes / self.formula_bytes if self.formula_bytes else float("nan")

    @property
    def held_over_predicted(self) -> float | None:
        return None if not self.predicted_bytes else self.held_bytes / self.predicted_bytes

    @property
    def bytes_per_token_saved(self) -> float:
        """Bytes held per token whose recomputation the cache saves (the window's tokens for a window)."""
        saved = self.length if self.window is None else min(self.length, self.window)
        return self.held_bytes / saved

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(
            speedup=self.speedup,
            held_over_formula=self.held_over_formula,
            held_over_predicted=self.held_over_predicted,
            bytes_per_token_saved=self.bytes_per_token_saved,
        )
        return out


@dataclass(frozen=True)
class RatioRow:
    """The reference's cached decode against transformers', alternating in one process."""

    preset: str
    loop: str  # "forward": one greedy loop drives both models' forward; "generate": each library's generate()
    reference_cache: str
    transformers_cache: str
    prompt: int
    new_tokens: int
    rounds: int
    reference_s_per_token: float  # medians
    transformers_s_per_token: float
    ratio: float  # median of per-round reference / transformers
    engine: str = "eager"  # the reference's decode engine: "eager" (DecodeStep) or "compiled" (engine/compiled.py)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Profile:
    environment: dict[str, object]
    rows: list[CacheRow] = field(default_factory=list)
    ratios: list[RatioRow] = field(default_factory=list)
    tracemalloc_bytes: int = 0  # peak tracemalloc saw while one 8 MiB tensor was allocated
    memray_bytes: int = 0  # the same, from memray
    cuda: dict[str, object] | None = None
    skipped: list[str] = field(default_factory=list)  # what was not measured, and why
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "environment": self.environment,
            "rows": [row.as_dict() for row in self.rows],
            "ratios": [row.as_dict() for row in self.ratios],
            "tracemalloc_vs_memray": {"tracemalloc_bytes": self.tracemalloc_bytes, "memray_bytes": self.memray_bytes},
            "cuda": self.cuda,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }
