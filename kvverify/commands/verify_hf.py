"""``kvverify verify-hf``: transformers' own models, cached against uncached, for each of its cache classes.

Each model is a tiny random-weight float32 transformers model built from a config (no hub access). The
uncached run is greedy recomputation, ``x[1:t+1] = LLM(x[1:t])``, on a batch of two prompts, one left-padded.
Each cache then prefills the same prompt and is fed the uncached run's tokens one at a time (teacher forcing:
up to the first differing token this *is* free-running greedy generation, and afterwards the logits stay
comparable). A pair passes when every step's logits are within the tolerance and every greedy token agrees,
except where the uncached run's top two logits are closer than the tolerance (a "near tie", reported).

Tolerance. transformers computes with the standard kernels, whose results depend on how many rows are
computed at once, so an exact cache still differs from recomputation by float noise: at most 1.2e-5 over
seeds 0-7 of llama, qwen2 and gpt2 (``kvverify verify-hf --seed N``, "max |Δ|" column), for logits of
magnitude up to about 8. ``EXACT_ATOL = 1e-4`` leaves a margin of 8x and is far below what a dropped
token does (above 0.1). A lossy cache has the tolerance of its entry in kvverify.adapters.hf.CACHES.

``--bitwise`` removes the noise instead: with eager attention and :func:`batch_invariant_cpu` (fixed-order
``mm``, ``addmm``, ``bmm`` and ``_softmax`` kernels), every exact cache must match recomputation bit for bit,
on all five models.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.adapters.hf.caches import CACHES, NotApplicable
from kvverify.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE

HELP = "compare cached and uncached generation of transformers' models"

EXACT_ATOL = 1e-4
BATCH, PROMPT_LEN, NEW_TOKENS, WINDOW = 2, 6, 12, 4  # the window is shorter than the generation


@dataclass(frozen=True)
class Comparison:
    """max_error: largest |cached - uncached| logit over all steps; mismatches: (row, step) where the greedy
    tokens differ; near_ties: those of them where the uncached top-2 gap is within the tolerance."""

    max_error: float
    atol: float
    mismatches: tuple[tuple[int, int], ...]
    near_ties: tuple[tuple[int, int], ...]

    @property
    def passed(self) -> bool:
        return self.max_error <= self.atol and len(self.mismatches) == len(self.near_ties)

    @property
    def tokens(self) -> str:
        if not self.mismatches:
            return "identical"
        if self.passed:
            return f"near tie at step {self.near_ties[0][1]}"
        row, step = next(m for m in self.mismatches if m not in self.near_ties)
        return f"differ: row {row} step {step}"


def _common(**extra: Any) -> dict[str, Any]:
    # initializer_range 0.2 spreads the logits (std ~1.5) so greedy choices are rarely near ties
    return dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra,
    )


def model_config(name: str) -> Any:
    """A tiny transformers config: GQA (4 query, 2 KV heads) except GPT-2, which has no GQA."""
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig(**_common())
    if name == "mistral":
        return tf.MistralConfig(**_common(sliding_window=WINDOW))
    if name == "qwen2":
        return tf.Qwen2Config(**_common())
    if name == "gemma2":  # alternating sliding and full layers, attention and final logit soft-capping
        return tf.Gemma2Config(**_common(head_dim=16, sliding_window=WINDOW))
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None,
        )
    raise KeyError(name)


MODELS = ("llama", "mistral", "qwen2", "gpt2", "gemma2")


def cache_atol(name: str, bitwise: bool = False) -> float:
    """The logit tolerance of a cache: its registry entry's for a lossy one, else EXACT_ATOL (0 when bitwise)."""
    atol = CACHES[name].atol
    if atol is not None:
        return atol
    return 0.0 if bitwise else EXACT_ATOL


def _ordered_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., M, K) @ b (..., K, N), summed over K strictly left to right: the same bits for a row whatever
    the number of rows, and trailing zeros (masked keys) change nothing."""
    products = a.unsqueeze(-1) * b.unsqueeze(-3)  # (..., M, K, N)
    if products.shape[-2] == 0:
        return products.sum(-2)
    return products.cumsum(-2).select(-2, -1)


def _ordered_addmm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    return beta * bias + alpha * _ordered_matmul(a, b)


def _ordered_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    x = x.float() if half_to_float else x
    weights = torch.exp(x - x.amax(dim, keepdim=True))
    return weights / weights.cumsum(dim).narrow(dim, weights.shape[dim] - 1, 1)


@contextmanager
def batch_invariant_cpu() -> Iterator[None]:
    """Within the block, aten ``mm``, ``addmm``, ``bmm`` and ``_softmax`` on CPU reduce in a fixed order (an
    elementwise product, then a cumulative sum), as the strict numerics of the reference model do. With
    eager attention, transformers' cached and uncached logits then agree bit for bit: linear layers
    (mm/addmm) no longer depend on how many rows are computed at once, and attention (bmm, softmax) no longer
    on how many masked keys pad the row. Memory grows to M*K*N per product: for tiny models only."""
    library: Any = torch.library.Library("aten", "IMPL")  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel"
            library.impl("mm", _ordered_matmul, "CPU")
            library.impl("bmm", _ordered_matmul, "CPU")
            library.impl("addmm", _ordered_addmm, "CPU")
            library.impl("_softmax", _ordered_softmax, "CPU")
        yield
    finally:
        library._destroy()


def build_model(name: str, seed: int = 0, attn_implementation: str | None = None) -> Any:
    import transformers as tf

    torch.manual_seed(seed)
    auto: Any = tf.AutoModelForCausalLM
    return auto.from_config(model_config(name), attn_implementation=attn_implementation).eval()


def make_prompt(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) and attention_mask (B, T): row 1 left-padded by 2."""
    tokens = torch.randint(0, vocab_size, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    return tokens, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, N): left padding does not shift positions


@torch.no_grad()
def uncached_greedy(model: Any, prompt: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """Recompute the whole prefix each step. Returns tokens (B, N) and logits (B, N, vocab)."""
    tokens, logits = [], []
    for _ in range(steps):
        out = model(input_ids=prompt, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        step = out.logits[:, -1].float()  # (B, vocab)
        token = step.argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(step)
        prompt = torch.cat((prompt, token), dim=1)
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


@torch.no_grad()
def cached_logits(
    model: Any, prompt: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, cache: Any
) -> torch.Tensor:
    """Prefill ``prompt`` into ``cache``, then feed ``tokens`` (B, N) one per step. Returns logits (B, N, vocab):
    step ``i`` is the prediction after ``prompt`` and ``tokens[:, :i]``."""
    full_mask = torch.cat((mask, torch.ones_like(tokens)), dim=1)  # (B, T + N)
    positions = _positions(full_mask)
    inputs, start, logits = prompt, 0, []
    for i in range(tokens.shape[1]):
        end = prompt.shape[1] + i
        out = model(input_ids=inputs, attention_mask=full_mask[:, :end], position_ids=positions[:, start:end],
                    cache=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
        inputs, start = tokens[:, i : i + 1], end
    return torch.stack(logits, dim=1)


def compare(ref_tokens: torch.Tensor, ref_logits: torch.Tensor, logits: torch.Tensor, atol: float) -> Comparison:
    """Per-step logits and greedy tokens of a cached run (teacher-forced) against the uncached one."""
    error = float((logits - ref_logits).abs().max())
    chosen = logits.argmax(-1)  # (B, N)
    top2 = ref_logits.topk(2, dim=-1).values  # (B, N, 2)
    gap = top2[..., 0] - top2[..., 1]
    mismatches = tuple((int(r), int(s)) for r, s in (chosen != ref_tokens).nonzero())
    near = tuple((r, s) for r, s in mismatches if float(gap[r, s]) <= atol)
    return Comparison(error, atol, mismatches, near)


@dataclass(frozen=True)
class Row:
    model: str
    cache: str
    comparison: Comparison | None
    reason: str = ""

    @property
    def verdict(self) -> str:
        if self.comparison is None:
            return "n/a"
        return "pass" if self.comparison.passed else "FAIL"


def verify_model(name: str, cache_names: list[str], seed: int = 0, bitwise: bool = False) -> list[Row]:
    """Compare every named cache with recomputation on one model (weights and prompt drawn from ``seed``);
    ``bitwise``: eager attention under :func:`batch_invariant_cpu`, exact caches compared with tolerance 0."""
    if bitwise:
        with batch_invariant_cpu():
            return _verify_model(name, cache_names, seed, bitwise)
    return _verify_model(name, cache_names, seed, bitwise)


def _verify_model(name: str, cache_names: list[str], seed: int, bitwise: bool) -> list[Row]:
    model = build_model(name, seed, "eager" if bitwise else None)
    prompt, mask = make_prompt(model.config.get_text_config().vocab_size, seed)
    ref_tokens, ref_logits = uncached_greedy(model, prompt, mask, NEW_TOKENS)
    rows = []
    for cache_name in cache_names:
        try:
            cache = CACHES[cache_name].for_model(model.config, PROMPT_LEN + NEW_TOKENS)
        except NotApplicable as why:
            rows.append(Row(name, cache_name, None, str(why)))
            continue
        logits = cached_logits(model, prompt, mask, ref_tokens, cache)
        rows.append(Row(name, cache_name, compare(ref_tokens, ref_logits, logits, cache_atol(cache_name, bitwise))))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("model", "cache", "max |Δ|", "tol", "tokens", "verdict")
    lines = [header]
    for row in rows:
        c = row.comparison
        if c is None:
            lines.append((row.model, row.cache, "-", "-", "-", f"n/a: {row.reason}"))
        else:
            lines.append((row.model, row.cache, f"{c.max_error:.2g}", f"{c.atol:g}", c.tokens, row.verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    padded = ("  ".join(f"{cell:<{w}}" for cell, w in zip(line[:-1], widths, strict=True)) for line in lines)
    return "\n".join(f"{cells}  {line[-1]}" for cells, line in zip(padded, lines, strict=True))


def _names(value: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(value)}; valid {what}s: {', '.join(valid)}")
    return names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated, from: {', '.join(CACHES)}")
    parser.add_argument("--seed", type=int, default=0, help="draws the weights and the prompts (default 0)")
    parser.add_argument("--bitwise", action="store_true",
                        help="fixed-order CPU kernels and eager attention: exact caches must match bit for bit")


def run(args: argparse.Namespace) -> int:
    try:
        models = _names(args.models, MODELS, "model")
        caches = _names(args.caches, tuple(CACHES), "cache")
    except ValueError as error:
        print(f"kvverify verify-hf: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import transformers
    except ImportError:
        print("kvverify verify-hf needs transformers: pip install 'kvverify[transformers]'", file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, float32, batch {BATCH} "
          f"(one row left-padded), prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, sliding window {WINDOW}, "
          f"seed {args.seed}" + (", batch-invariant kernels (bitwise)" if args.bitwise else ""))
    rows = [row for model in models for row in verify_model(model, caches, args.seed, args.bitwise)]
    print(format_table(rows))
    print("caches: " + "; ".join(f"{name} = {CACHES[name].what}" for name in caches))
    failed = [row for row in rows if row.verdict == "FAIL"]
    ran = sum(row.comparison is not None for row in rows)
    print(f"{ran} pairs compared, {len(failed)} failed, {len(rows) - ran} not applicable "
          f"in {time.perf_counter() - started:.1f} s")
    return EXIT_FAILED if failed else EXIT_OK
