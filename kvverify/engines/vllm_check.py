"""``kvverify verify-engine vllm``: vLLM's CPU engine, request by request, against the reference model generating
each request alone without a cache, within a measured tolerance (run in the engine-vllm tox env).

Hypothesis draws schedules (:func:`schedules`): 1 to 8 requests with prompts of 1 to 160 tokens (half of them
moved up to end 0 to 2 tokens short of a block boundary, so that decoding soon needs a new block), many sharing
a prefix of whole or partial blocks with an earlier request, 1 to 24 new tokens each, some arriving while others
decode, on an engine with prefix caching on (two times in three) or off, blocks of 32 or 64 tokens, a token
budget per step small enough to chunk prefills, 2 to 16 running requests, and, three times in four, only as many
KV blocks as the prompts or the longest request need, so that concurrent requests preempt each other as they
grow. The model is the reference model (:data:`MODEL`) written as a Llama checkpoint, so the oracle is
kvverify's own, in strict numerics: one uncached forward over a request's prompt and the tokens vLLM chose
gives, at each position, the logits of that prefix computed alone (strict numerics make a row's bits
independent of the other rows).

The property, for every request: each step's logits within :data:`ATOL` of the reference's, and each greedy
token the reference's argmax except at a near tie (the reference's top two closer than twice the tolerance),
the rule of ``kvverify verify-hf`` (:func:`kvverify.checks.compare.compare_generations`, teacher-forced: the
reference is fed vLLM's tokens, so a near tie splits nothing and every step is compared); and each token vLLM
chose is the argmax of the logits it returned. A failure shrinks to a minimal schedule and names the request,
the step, and what the scheduler did to that request (prefix-cache hits, prefill chunks, preemptions, blocks).

Tolerance. vLLM computes with its own kernels (oneDNN matmuls, C++ paged attention), so its float32 logits differ
from the strict reference by rounding: at most 3.4e-6 in every run of this check so far (five ci runs with seeds 0
and 1 and four dev runs, 152 examples, 618 requests; ``--atol inf`` reports the largest without judging, the
"max |Δ|" column), for logits up to 4.7 in magnitude. :data:`ATOL` = 2e-5 leaves a margin of 6x, the same value
as the reference's own fast-numerics tolerance in float32. It is far below what a wrong cache entry does: one
prompt token changed moves the last logits by at least 0.038 (median 0.13, over 20 random prompts of this model).

Exit codes (``kvverify verify-engine``'s): 0 every request of every example held, 1 one failed (its report
printed), 2 vLLM is missing or the arguments are wrong.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from rich.table import Table

from kvverify.checks.compare import Tolerance, compare_generations
from kvverify.engines.llama_checkpoint import write_llama_checkpoint
from kvverify.engines.vllm_engine import EngineError, EngineKnobs, EngineRequest, RequestResult, VllmEngine
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import Generation, ReferenceModel
from kvverify.runs.runner import PropertyResult, SuiteResult
from kvverify.runs.settings import profile_settings, use_storage_directory
from kvverify.runs.tables import table

#: The served model: float32, strict numerics, 2 layers, GQA (4 query heads, 2 KV heads) with head_dim 32, the
#: smallest head size vLLM's CPU attention takes (32 to 512; the reference's ``tiny`` preset has 8).
MODEL = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=512)

#: Examples per profile: each starts an engine (a quarter of a second once the first is warm) and runs a few
#: dozen engine steps, about 1.5 s an example on 2 cores.
EXAMPLES: dict[str, int] = {"dev": 8, "ci": 24, "thorough": 200}

#: The logit tolerance (see the module docstring for how it was measured).
ATOL = 2e-5

MAX_REQUESTS, MAX_PROMPT, MAX_NEW, MAX_ARRIVAL = 8, 160, 24, 24
BLOCK_SIZES = (32, 64)  # vLLM's CPU attention takes multiples of 32
BUDGETS = (16, 32, 64, 128, 512)  # max_num_batched_tokens: below the longer prompts, prefills are chunked
RUNNING = (2, 4, 16)  # max_num_seqs


@dataclass(frozen=True)
class Schedule:
    """One drawn example: the engine's knobs and the requests; ``shares[i]`` is ``(j, n)`` when request i's
    prompt starts with the first n tokens of request j's (None: a fresh prompt)."""

    knobs: EngineKnobs
    requests: tuple[EngineRequest, ...]
    shares: tuple[tuple[int, int] | None, ...]

    def describe(self) -> str:
        lines = [f"engine: {self.knobs.describe()}, max_model_len {self.knobs.max_model_len}"]
        for i, (request, share) in enumerate(zip(self.requests, self.shares, strict=True)):
            origin = "fresh" if share is None else f"its first {share[1]} shared with request {share[0]}"
            lines.append(f"request {i}: prompt {len(request.prompt)} tokens ({origin}), {request.max_new_tokens} new, "
                         f"arrives before step {request.arrival_step}")
        return "\n".join(lines)


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@st.composite
def schedules(draw: st.DrawFn, *, vocab_size: int = MODEL.vocab_size, max_requests: int = MAX_REQUESTS) -> Schedule:
    """A schedule for :class:`VllmEngine` (see the module docstring). Invariants: every request fits
    ``max_model_len``, which fits ``(num_blocks - 1) * block_size``; the budget is at least the running requests.
    Example: ``@given(schedule=schedules())`` then ``VllmEngine(dir, schedule.knobs).run(schedule.requests)``.
    """
    block_size = draw(st.sampled_from(BLOCK_SIZES), label="block_size")
    running = draw(st.sampled_from(RUNNING), label="max_num_seqs")
    budget = draw(st.sampled_from([b for b in BUDGETS if b >= running]), label="max_num_batched_tokens")
    prefix_caching = draw(st.sampled_from([True, True, False]), label="enable_prefix_caching")  # on: 2 in 3
    count = draw(st.integers(1, max_requests), label="requests")
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="token seed"))

    def fresh(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    prompts: list[list[int]] = []
    shares: list[tuple[int, int] | None] = []
    requests: list[EngineRequest] = []
    for _ in range(count):
        shared = bool(prompts) and draw(st.booleans(), label="shares a prefix")
        if shared:
            source = draw(st.integers(0, len(prompts) - 1), label="with request")
            whole = len(prompts[source]) // block_size
            if whole and draw(st.booleans(), label="whole blocks"):
                length = block_size * draw(st.integers(1, whole), label="shared blocks")
            else:
                length = draw(st.integers(1, len(prompts[source])), label="shared tokens")
            total = length + draw(st.integers(0, max(0, MAX_PROMPT - length)), label="own tokens")
        else:
            length, total = 0, draw(st.integers(1, MAX_PROMPT), label="prompt tokens")
        if draw(st.booleans(), label="ends near a block boundary"):  # its first decode tokens need a new block
            total = max(length, 1, _blocks(total, block_size) * block_size - draw(st.integers(0, 2), label="short by"))
        prompt = (prompts[source][:length] if shared else []) + fresh(total - length)
        shares.append((source, length) if shared else None)
        prompts.append(prompt)
        late = draw(st.booleans(), label="arrives late")
        arrival = draw(st.integers(1, MAX_ARRIVAL), label="arrival step") if late else 0
        requests.append(EngineRequest(tuple(prompt), draw(st.integers(1, MAX_NEW), label="new tokens"), arrival))
    longest = max(r.length for r in requests)
    # KV blocks, plus the one vLLM holds back (its null block). "prompts" (half the draws): the prompts of as many
    # requests as may run at once fit, so they are admitted together and preempt each other as their decodes cross
    # into new blocks;
    # "longest": only the longest request is sure to fit; "roomy": every request to its end, nothing is preempted.
    room = draw(st.sampled_from(["prompts", "prompts", "longest", "roomy"]), label="KV blocks")
    together = sorted((_blocks(len(r.prompt), block_size) for r in requests), reverse=True)[:running]
    need = {"prompts": max(_blocks(longest, block_size), sum(together)),
            "longest": _blocks(longest, block_size),
            "roomy": sum(_blocks(r.length, block_size) for r in requests)}[room]
    num_blocks = need + 1
    knobs = EngineKnobs(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                        max_num_seqs=running, enable_prefix_caching=prefix_caching, max_model_len=longest)
    return Schedule(knobs, tuple(requests), tuple(shares))


class RequestMismatch(AssertionError):
    """A request's tokens or logits from the engine differ from the reference's beyond the tolerance."""


@dataclass(frozen=True)
class ExampleRow:
    """One example that held: its schedule, what the engine did, the largest logit difference and the near ties."""

    schedule: Schedule
    results: tuple[RequestResult, ...]
    late_arrivals: int
    max_abs: float
    near_ties: int
    seconds: float

    @property
    def preempted(self) -> int:
        return sum(r.preemptions > 0 for r in self.results)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.results)

    @property
    def chunked(self) -> int:
        return sum(r.prefill_chunks > 0 for r in self.results)


def reference_logits(model: ReferenceModel, prompt: tuple[int, ...], tokens: tuple[int, ...]) -> torch.Tensor:
    """(N, vocab): the reference's logits before each of ``tokens`` (teacher-forced on them), one uncached
    forward over the prompt and all but the last token."""
    sequence = torch.tensor([list(prompt) + list(tokens[:-1])], device=model.config.device)  # (1, T + N - 1)
    with torch.no_grad():
        logits: torch.Tensor = model(sequence)  # (1, T + N - 1, vocab)
    return logits[0, len(prompt) - 1:].float()  # (N, vocab)


def _generation(tokens: torch.Tensor, logits: torch.Tensor) -> Generation:
    """A one-row :class:`Generation` of (N,) tokens and (N, vocab) logits, for the suite's comparison."""
    return Generation(tokens=tokens[None], logits=logits[None], sequences=tokens[None],
                      attention_mask=torch.ones_like(tokens)[None], cache=None)


def _report(schedule: Schedule, index: int, result: RequestResult, what: str) -> str:
    request = schedule.requests[index]
    events = "\n".join(f"  step {step}: {event}" for step, event in result.events[-40:])
    return (f"request {index} of {len(schedule.requests)} (prompt {len(request.prompt)} tokens, "
            f"{request.max_new_tokens} new, arrives before step {request.arrival_step}): {what}\n"
            f"what the engine did to request {index} (engine steps):\n{events}\n"
            f"the schedule:\n{schedule.describe()}")


def check_schedule(model: ReferenceModel, model_dir: Path, schedule: Schedule, atol: float) -> ExampleRow:
    """Run ``schedule`` on a fresh engine and compare every request with the reference; raise
    :class:`RequestMismatch` at the first request that differs (EngineError when vLLM refuses the schedule)."""
    started = time.perf_counter()
    with VllmEngine(model_dir, schedule.knobs) as engine:
        run = engine.run(schedule.requests)
    tolerance = Tolerance(atol=atol, why="vLLM's CPU kernels against the strict reference, float32")
    max_abs, near_ties = 0.0, 0
    for index, (request, result) in enumerate(zip(schedule.requests, run.results, strict=True)):
        tokens = torch.tensor(result.tokens)
        chosen = result.logits.gather(1, tokens[:, None])[:, 0]
        unlike = (chosen < result.logits.max(dim=1).values).nonzero().flatten().tolist()
        if unlike:
            raise RequestMismatch(_report(schedule, index, result, f"at step {unlike[0]} vLLM chose token "
                                          f"{result.tokens[unlike[0]]}, which is not the argmax of its own logits"))
        expected_logits = reference_logits(model, request.prompt, result.tokens)
        expected = _generation(expected_logits.argmax(-1), expected_logits)
        agreement = compare_generations(expected, _generation(tokens, result.logits), tolerance, teacher_forced=True)
        if agreement.mismatch is not None:
            raise RequestMismatch(_report(schedule, index, result, str(agreement.mismatch)))
        max_abs, near_ties = max(max_abs, agreement.max_abs), near_ties + len(agreement.near_ties)
    return ExampleRow(schedule, run.results, run.late_arrivals, max_abs, near_ties, time.perf_counter() - started)


@dataclass(frozen=True)
class CheckResult:
    """The examples that held, in the order they ran (up to the first failure), and the minimal failure's
    report (None: every example held)."""

    rows: tuple[ExampleRow, ...]
    failure: str | None
    atol: float
    seconds: float


def run_check(*, profile: str = "ci", seed: int = 0, atol: float = ATOL, max_examples: int | None = None,
              on_example: Callable[[ExampleRow], None] | None = None) -> CheckResult:
    """Draw schedules (the profile's :data:`EXAMPLES`, or ``max_examples``) from ``seed``, which also draws the
    model's weights, and check each; a failure is shrunk by Hypothesis to a minimal schedule."""
    if profile not in EXAMPLES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(EXAMPLES)}")
    if not (isinstance(atol, float) and atol >= 0) or math.isnan(atol):
        raise ValueError(f"atol must be a float >= 0 (inf: report differences without judging); got {atol!r}")
    use_storage_directory()
    started = time.perf_counter()
    model = ReferenceModel(MODEL, seed=seed)
    rows: list[ExampleRow] = []
    failed: list[BaseException] = []
    count = EXAMPLES[profile] if max_examples is None else max_examples
    with tempfile.TemporaryDirectory(prefix="kvverify-vllm-") as directory:
        model_dir = write_llama_checkpoint(model, directory)

        @hypothesis_seed(seed)
        @profile_settings(profile, max_examples=count)
        @given(schedule=schedules())
        def examples(schedule: Schedule) -> None:
            try:
                row = check_schedule(model, model_dir, schedule, atol)
            except (RequestMismatch, EngineError) as error:
                failed.append(error)
                raise
            if not failed:  # once one failed, the rest are Hypothesis shrinking it
                rows.append(row)
                if on_example is not None:
                    on_example(row)

        failure = None
        try:
            examples()
        except (RequestMismatch, EngineError) as error:
            failure = f"{type(error).__name__}: {error}"
    return CheckResult(tuple(rows), failure, atol, time.perf_counter() - started)


def format_table(rows: tuple[ExampleRow, ...]) -> Table:
    """One row per example: its requests and tokens, the engine's knobs, what the scheduler did (requests that
    arrived while others decoded, prompt tokens read from the prefix cache, requests whose prefill was chunked,
    requests preempted), the largest logit difference, near ties and seconds."""
    headers = ("#", "requests", "tokens", "engine", "late", "cached", "chunked", "preempted", "max |Δ|", "ties", "s")
    result = table(*headers, right=("#", "requests", "tokens", "late", "cached", "chunked", "preempted", "ties", "s"))
    for number, row in enumerate(rows):
        requests = row.schedule.requests
        result.add_row(str(number), str(len(requests)), str(sum(r.length for r in requests)),
                       row.schedule.knobs.describe(), str(row.late_arrivals), str(row.cached_tokens), str(row.chunked),
                       str(row.preempted), f"{row.max_abs:.2g}", str(row.near_ties), f"{row.seconds:.1f}")
    return result


def summary(result: CheckResult) -> str:
    """How many examples reached each of the engine's hard paths, the largest difference and the verdict."""
    rows, n = result.rows, len(result.rows)

    def share(count: int) -> str:
        return f"{count}/{n} ({100 * count / max(n, 1):.0f}%)"

    largest = max((row.max_abs for row in rows), default=0.0)
    return (f"{n} examples held, {sum(len(r.schedule.requests) for r in rows)} requests, {result.seconds:.0f} s. "
            f"Examples that preempted a request: {share(sum(r.preempted > 0 for r in rows))}; read the prefix cache: "
            f"{share(sum(r.cached_tokens > 0 for r in rows))}; chunked a prefill: "
            f"{share(sum(r.chunked > 0 for r in rows))}; took a request while others decoded: "
            f"{share(sum(r.late_arrivals > 0 for r in rows))}; prefix caching off: "
            f"{share(sum(not r.schedule.knobs.enable_prefix_caching for r in rows))}.\n"
            f"Largest logit difference {largest:.3g} (tolerance {result.atol:g}); near ties: "
            f"{sum(r.near_ties for r in rows)}.")


def engine_version() -> str:
    """vLLM's version and torch's, for the run's header; ImportError (saying where vLLM lives) or EngineError
    when it cannot run here."""
    from kvverify.engines.vllm_engine import import_vllm

    return (f"vLLM {import_vllm().__version__}, torch {torch.__version__}, model {MODEL.n_layers} layers d_model "
            f"{MODEL.d_model} head_dim {MODEL.head_dim} vocab {MODEL.vocab_size} float32")


def progress(row: ExampleRow) -> None:
    """One line per example that held, as it holds."""
    print(f"example held: {len(row.schedule.requests)} requests, {row.schedule.knobs.describe()}, "
          f"max |Δ| {row.max_abs:.2g}, {row.seconds:.1f} s", flush=True)


#: The property's name in the table and in JUnit.
PROPERTY = "matches_alone_within_tolerance"


def as_suite(result: CheckResult, *, profile: str, seed: int, reproduce: str) -> SuiteResult:
    """The check as the suite's own result (one property), for ``verify-engine``'s table, JUnit and exit code."""
    largest = max((row.max_abs for row in result.rows), default=0.0)
    if result.failure is None:
        outcome = PropertyResult(PROPERTY, "passed", len(result.rows), result.seconds, largest_difference=largest)
    else:
        outcome = PropertyResult(PROPERTY, "failed", len(result.rows), result.seconds,
                                 f"minimal schedule after shrinking:\n{result.failure}", reproduce=reproduce)
    return SuiteResult("vllm", seed, profile, [outcome], device="cpu", shapes=f"{MODEL.n_layers} layers, d_model "
                       f"{MODEL.d_model}, head_dim {MODEL.head_dim}, float32",
                       declaration=f"within {result.atol:g} of the strict reference, near ties as verify-hf")
