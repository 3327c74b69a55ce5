"""A drawn engine schedule: the model, the engine's knobs and the requests, as plain frozen dataclasses.

A schedule is engine-neutral: it says what to run (prompts, when each arrives, how many tokens to generate) and
with which knobs (page size, number of cache blocks, token budget per step, block sharing), and each engine
adapter (:mod:`kvverify.engines.adapter`) maps it onto its own API. Its ``repr`` is valid Python, so a failing
schedule can be written into a reproduction script as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Layer kinds a drawn model can have: every layer full attention, every layer sliding, or alternating.
LAYER_KINDS = ("full", "sliding", "mixed")
#: Attention implementations: transformers' continuous batching on the CPU (``paged|eager``, ``sdpa``), or the
#: engine's own kernels, which kvverify cannot choose (``native``: vLLM's C++ paged attention).
ATTENTIONS = ("paged|eager", "sdpa", "native")
#: Schedulers: first come first served (transformers' ``fifo``, vLLM's ``fcfs``), or transformers'
#: ``prefill_first``.
SCHEDULERS = ("fifo", "prefill_first")


@dataclass(frozen=True)
class ModelSpec:
    """A tiny random-weight decoder: ``layers`` kind (see :data:`LAYER_KINDS`), ``window`` the sliding window
    (None for all-full models), ``attention`` the engine's attention implementation, ``seed`` the weights. The
    engine's adapter builds the model it names (its size is the adapter's: see each adapter)."""

    layers: str = "full"
    window: int | None = None
    attention: str = "paged|eager"
    seed: int = 0
    vocab: int = 96

    def __post_init__(self) -> None:
        if self.layers not in LAYER_KINDS:
            raise ValueError(f"ModelSpec.layers must be one of {LAYER_KINDS}; got {self.layers!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelSpec.attention must be one of {ATTENTIONS}; got {self.attention!r}")
        if (self.layers == "full") != (self.window is None):
            raise ValueError(f"ModelSpec.window must be None for full layers and an int >= 2 for sliding or mixed "
                             f"ones; got layers={self.layers!r}, window={self.window!r}")
        if self.window is not None and self.window < 2:
            raise ValueError(f"ModelSpec.window must be >= 2; got {self.window}")

    @property
    def has_sliding(self) -> bool:
        return self.layers != "full"


@dataclass(frozen=True)
class RequestSpec:
    """One request: its prompt token ids, the tokens to generate, and ``arrival``, the engine step before which
    it is submitted (0: before the first step, so with the others; k: while the earlier ones run; when the engine
    goes idle before step k, the next requests to arrive are submitted at once)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("RequestSpec.prompt must hold at least one token id; got an empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"RequestSpec.max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.arrival < 0:
            raise ValueError(f"RequestSpec.arrival must be >= 0; got {self.arrival}")

    @property
    def total_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens


@dataclass(frozen=True)
class EngineKnobs:
    """The engine's knobs: ``page_size`` tokens per cache page, ``num_blocks`` cache blocks (whole-model pages),
    ``max_batch_tokens`` query tokens per step (below a prompt's length, prefill is chunked), ``block_sharing``
    (prefix caching; an engine may allow it only for some models), ``scheduler``, ``max_running`` requests
    running at once (None: the engine's own limit; vLLM's ``max_num_seqs``)."""

    page_size: int = 4
    num_blocks: int = 64
    max_batch_tokens: int = 64
    block_sharing: bool = True
    scheduler: str = "fifo"
    max_running: int | None = None

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.num_blocks < 1 or self.max_batch_tokens < 1:
            raise ValueError(f"EngineKnobs: page_size, num_blocks and max_batch_tokens must be >= 1; got {self}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"EngineKnobs.scheduler must be one of {SCHEDULERS}; got {self.scheduler!r}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"EngineKnobs.max_running must be None or >= 1; got {self.max_running}")


@dataclass(frozen=True)
class Schedule:
    """What one engine run does: a model, the knobs, and the requests (named ``r0``, ``r1``, ... in order)."""

    model: ModelSpec
    knobs: EngineKnobs
    requests: tuple[RequestSpec, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("Schedule.requests must hold at least one request; got none")
        too_big = [t for r in self.requests for t in r.prompt if not 0 <= t < self.model.vocab]
        if too_big:
            raise ValueError(f"Schedule: token ids must lie in [0, {self.model.vocab}); got {too_big[0]}")

    @staticmethod
    def request_id(index: int) -> str:
        return f"r{index}"

    def describe(self) -> str:
        """The schedule in a few lines: the model, the knobs, then one line per request."""
        m, k = self.model, self.knobs
        window = f", window {m.window}" if m.window is not None else ""
        lines = [f"model: {m.layers} layers{window}, attention {m.attention}, weights seed {m.seed}",
                 f"knobs: page_size {k.page_size}, num_blocks {k.num_blocks}, max_batch_tokens "
                 f"{k.max_batch_tokens}, block_sharing {k.block_sharing}, scheduler {k.scheduler}"
                 + (f", max_running {k.max_running}" if k.max_running is not None else "")]
        for i, r in enumerate(self.requests):
            lines.append(f"{self.request_id(i)}: prompt of {len(r.prompt)} {_preview(r.prompt)}, "
                         f"{r.max_new_tokens} new, arrives before step {r.arrival}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ScheduleSpace:
    """What the strategies (:mod:`kvverify.engines.strategies`) may draw for one engine: the defaults are
    transformers' continuous batching. Tuples are drawn uniformly, so a repeated entry weighs more.
    ``max_running``: empty, the engine's own limit (not drawn). ``near_boundary``: half the prompts are moved
    to end 0 to 2 tokens short of a page boundary, so that their first decodes need a new block (with few
    blocks, what makes an engine with large pages preempt)."""

    layers: tuple[str, ...] = ("full", "sliding", "full", "mixed", "full")  # full three times in five
    attentions: tuple[str, ...] = ("paged|eager", "sdpa")
    weight_seeds: int = 2  # weights drawn from seeds 0 .. weight_seeds - 1
    vocab: int = 96
    page_sizes: tuple[int, ...] = (4, 5, 8, 16)  # transformers' minimum of 4, an odd one, larger powers of two
    schedulers: tuple[str, ...] = SCHEDULERS
    max_running: tuple[int, ...] = ()
    max_requests: int = 16
    max_prompt: int = 300
    max_new_tokens: int = 8
    max_arrival: int = 12
    min_batch_tokens: int = 1
    max_batch_tokens: int = 256
    near_boundary: bool = False

    def __post_init__(self) -> None:
        for name, values, allowed in (("layers", self.layers, LAYER_KINDS), ("attentions", self.attentions, ATTENTIONS),
                                      ("schedulers", self.schedulers, SCHEDULERS)):
            if not values or not set(values) <= set(allowed):
                raise ValueError(f"ScheduleSpace.{name} must be a non-empty tuple of {allowed}; got {values!r}")
        counts = ("vocab", "max_requests", "max_prompt", "max_new_tokens", "min_batch_tokens")
        if any(getattr(self, name) < 1 for name in counts) or not self.page_sizes or self.weight_seeds < 1 \
                or min((*self.page_sizes, *self.max_running)) < 1 or self.max_arrival < 0 \
                or self.max_batch_tokens < self.min_batch_tokens:
            raise ValueError(f"ScheduleSpace: counts and page sizes must be >= 1, max_arrival >= 0 and "
                             f"max_batch_tokens >= min_batch_tokens; got {self}")

    @property
    def has_sliding(self) -> bool:
        """Whether any drawn model has sliding layers."""
        return any(kind != "full" for kind in self.layers)


def _preview(tokens: tuple[int, ...]) -> str:
    shown = ", ".join(map(str, tokens[:8]))
    return f"[{shown}{', ...' if len(tokens) > 8 else ''}]"
