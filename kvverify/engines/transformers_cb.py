"""transformers' continuous batching as an engine adapter: ``ContinuousBatchingManager`` with its
``PagedAttentionCache`` (full and sliding allocators), scheduler and offloading manager, driven step by step.

The manager's background thread runs ``prepare_next_batch``, the forward and ``update_batch`` in a loop; here the
same three calls run in this thread, so that requests can arrive before a chosen step and a run is
reproducible. Logits are captured where the engine samples from them (``ModelRunner._sample``); allocation,
sharing and preemption are recorded by wrapping the cache's and the offloading manager's methods on the
instances of this run (the installed package is never changed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import torch

from kvverify.adapters import import_transformers
from kvverify.checks.watchdog import DEFAULT_TIME_LIMIT
from kvverify.engines.adapter import EngineRun, RequestOutput, Step
from kvverify.engines.kernels import invariant_kernels
from kvverify.engines.models import build_model
from kvverify.engines.oracle import AloneOracle
from kvverify.engines.schedule import ModelSpec, Schedule, ScheduleSpace

#: Steps past which a run is declared stuck: this many times the tokens the schedule processes, plus a margin.
STEPS_PER_TOKEN = 4


class TransformersEngine:
    """transformers' ``ContinuousBatchingManager`` on the CPU (``num_blocks`` is always set: no psutil here)."""

    name = "transformers"
    space = ScheduleSpace()  # the defaults are this engine's
    oracle = AloneOracle()
    #: An example is a whole serving run plus its oracle, so far fewer than a cache property's. The ci count is
    #: sized so that ``verify-engine transformers --profile ci`` stays under 5 minutes on 2 cores and every hard
    #: path is reached by at least 10% of its examples.
    examples = MappingProxyType({"dev": 20, "ci": 200, "thorough": 2000})
    properties = ("matches_alone", "independent_of_neighbours")
    time_limit = DEFAULT_TIME_LIMIT

    def version(self) -> str:
        return f"transformers {import_transformers().__version__}"

    def description(self) -> str:
        return ("ContinuousBatchingManager stepped in this thread, PagedAttentionCache (full and sliding "
                "allocators), fifo and prefill_first schedulers, soft-reset preemption")

    def allows_sharing(self, model: ModelSpec) -> bool:
        # PagedAttentionCache shares blocks only when every allocator can: the sliding one cannot
        return model.layers == "full"

    def run(self, schedule: Schedule) -> EngineRun:
        model = build_model(schedule.model)
        with invariant_kernels(), torch.no_grad(), _quiet():
            return _Driver(schedule, model).run()


class _Driver:
    """One run: the manager, its batch processor, and the record of what happened."""

    def __init__(self, schedule: Schedule, model: Any) -> None:
        self.schedule = schedule
        self.model = model
        self.steps: list[Step] = []
        self.reached: set[str] = set()
        self.logits: dict[str, dict[int, torch.Tensor]] = {}
        self.finished: dict[str, list[int]] = {}
        self.current = Step(0)  # the step being scheduled and run: events go there

    def run(self) -> EngineRun:
        cb = import_transformers("generation.continuous_batching")
        manager = cb.ContinuousBatchingManager(self.model, self._generation_config(), self._cb_config())
        try:
            processor = manager._create_batch_processor()
            manager.batch_processor = processor
            self._instrument(processor)
            error = self._loop(manager, processor)
        except Exception as raised:  # the engine's own error: the property reports it
            error = f"{type(raised).__name__}: {raised}"
        finally:
            if manager._original_attn_impl is not None:
                self.model.set_attn_implementation(manager._original_attn_impl)
        self._collect(manager)
        outputs = {rid: RequestOutput(tokens, [self.logits.get(rid, {}).get(i) for i in range(len(tokens))])
                   for rid, tokens in self.finished.items()}
        if self.schedule.model.has_sliding and any(r.total_len - 1 > (self.schedule.model.window or 0)
                                                    for r in self.schedule.requests):
            self.reached.add("sliding")
        return EngineRun(outputs, self.steps, self.reached, error)

    def _generation_config(self) -> Any:
        return import_transformers().GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)

    def _cb_config(self) -> Any:
        knobs = self.schedule.knobs
        config_class = import_transformers("generation.configuration_utils").ContinuousBatchingConfig
        return config_class(
            page_size=knobs.page_size, num_blocks=knobs.num_blocks, max_batch_tokens=knobs.max_batch_tokens,
            allow_block_sharing=knobs.block_sharing, scheduler_type=knobs.scheduler,
            auto_switch_to_flash=False, use_cuda_graph=False, use_async_batching=False,
            max_memory_percent=0.9, cpu_offload_space=0.0,
        )

    def _loop(self, manager: Any, processor: Any) -> str | None:
        requests = sorted(enumerate(self.schedule.requests), key=lambda item: item[1].arrival)
        limit = STEPS_PER_TOKEN * sum(r.total_len for r in self.schedule.requests) + 64
        while True:
            step = len(self.steps)
            idle = not processor.has_pending_requests() and manager.input_queue.empty()
            due = max(step, requests[0][1].arrival) if idle and requests else step  # idle: the next ones now
            while requests and requests[0][1].arrival <= due:
                index, request = requests.pop(0)
                manager.add_request(list(request.prompt), request_id=self.schedule.request_id(index),
                                    max_new_tokens=request.max_new_tokens)
            if self.current.index != step:
                self.current = Step(step)
            if not processor.prepare_next_batch():
                if requests:
                    continue
                return None
            self.current.batch = [(f.state.request_id, f.state.position_offset - f.query_length, f.query_length)
                                  for f in processor.inputs_and_outputs.requests_in_batch]
            if any(not f.has_new_token for f in processor.inputs_and_outputs.requests_in_batch):
                self.reached.add("chunked")
            self.steps.append(self.current)
            processor._generation_step(self.model)
            processor.update_batch()
            self._drain(manager)
            if step > limit:
                return f"the engine was still running after {step} steps (at most {limit} expected): stuck"

    def _drain(self, manager: Any) -> None:
        output_queue = manager.output_router.output_queue
        while not output_queue.empty():
            output = output_queue.get_nowait()
            if output.error is not None:
                raise RuntimeError(f"request {output.request_id} failed inside the engine: {output.error}")
            if output.is_finished():
                self.finished[output.request_id] = list(output.generated_tokens)

    def _collect(self, manager: Any) -> None:
        with contextlib.suppress(Exception):
            self._drain(manager)

    # --- instrumentation: wrappers on this run's instances only ---

    def _instrument(self, processor: Any) -> None:
        cache, runner, offloader = processor.cache, processor.model_runner, processor.offloading_manager
        rows: list[torch.Tensor] = []

        def sample(original: Callable[..., Any], scores: torch.Tensor, output_ids: torch.Tensor) -> Any:
            rows.clear()
            rows.extend(scores.reshape(-1, scores.shape[-1]).detach().clone())
            return original(scores, output_ids)

        def update_batch(original: Callable[..., Any]) -> Any:
            row = 0
            for future in processor.inputs_and_outputs.requests_in_batch:
                if not future.has_new_token:
                    continue
                state = future.state
                position = _generated_before(state)
                self.logits.setdefault(state.request_id, {})[position] = rows[row]
                self.current.events.append(f"{state.request_id} chose token #{position} "
                                           f"{int(rows[row].argmax())}")
                row += 1
            return original()

        def prefix_match(original: Callable[..., Any], request_id: str, prompt_ids: list[int]) -> int:
            matched = int(original(request_id, prompt_ids))
            if matched:
                self.reached.add("shared")
                self._event(f"{request_id} shares {matched} prompt tokens: blocks {self._blocks(cache, request_id)}")
            return matched

        def store(original: Callable[..., Any], state: Any, request_len: int, dry_run: bool = False) -> bool:
            before = self._blocks(cache, state.request_id)
            ok = bool(original(state, request_len, dry_run))
            after = self._blocks(cache, state.request_id)
            if after != before:
                self._event(f"{state.request_id} allocated for {request_len} tokens: blocks {after}")
            elif not ok:
                self._event(f"{state.request_id} denied {request_len} tokens: cache full")
            return ok

        def free(original: Callable[..., Any], request_id: str, no_cache: bool = False) -> None:
            blocks = self._blocks(cache, request_id)
            original(request_id, no_cache)
            self._event(f"{request_id} freed blocks {blocks}" + (" (not kept for sharing)" if no_cache else ""))

        def offload(original: Callable[..., Any]) -> bool:
            active = set(processor.scheduler.active_requests)
            result = bool(original())
            victims = sorted(active - set(processor.scheduler.active_requests))
            if victims:
                self.reached.add("preempted")
                self._event(f"preempted {', '.join(victims)}: soft reset, to be prefilled again")
            return result

        def mark_complete(original: Callable[..., Any], state: Any, complete_blocks: dict[str, int]) -> None:
            before = self._blocks(cache, state.request_id)
            original(state, complete_blocks)
            after = self._blocks(cache, state.request_id)
            if after != before:
                self.reached.add("shared")
                self._event(f"{state.request_id} adopted an identical block: blocks {before} -> {after}")

        _wrap(runner, "_sample", sample)
        _wrap(processor, "update_batch", update_batch)
        _wrap(cache, "search_prefix_match", prefix_match)
        _wrap(cache, "can_store_request_tokens", store)
        _wrap(cache, "free_blocks", free)
        _wrap(offloader, "offload_requests", offload)
        _wrap(cache, "mark_complete_blocks", mark_complete)

    def _event(self, text: str) -> None:
        self.current.events.append(text)

    @staticmethod
    def _blocks(cache: Any, request_id: str) -> dict[str, list[int]] | list[int]:
        tables = {name.split("_")[0]: list(a.block_table.get(request_id, []))
                  for name, a in cache.cache_allocators.items()}
        return next(iter(tables.values())) if len(tables) == 1 else tables


def _generated_before(state: Any) -> int:
    """How many tokens the request had generated before this step: after a soft reset, the tokens generated
    before it are part of its new prompt."""
    earlier = len(state.initial_tokens) - state._true_initial_tokens if state._true_initial_tokens else 0
    return earlier + len(state.generated_tokens)


def _wrap(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Replace ``owner.name`` (on this instance only) by ``wrapper(original, *args)``."""
    original = getattr(owner, name)
    setattr(owner, name, lambda *args, **kwargs: wrapper(original, *args, **kwargs))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the engine's logger (psutil warnings, per-request debug lines) for the run."""
    engine_logger = logging.getLogger("ContinuousBatchingLogger")
    level = engine_logger.level
    engine_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        engine_logger.setLevel(level)
