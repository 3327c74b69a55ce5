"""What the batch-invariant mode costs: a transformers Llama of 4 layers, d_model 512, head_dim 64 (8 query and
2 KV heads, d_ff 1376, vocab 1024; random weights, sdpa attention) run forward over 512 tokens, batch 1, with
the standard kernels and inside :func:`kvverify.invariant.batch_invariant`.

Time (one torch thread): ``pytest profiles/test_invariant_cost.py -m benchmark --benchmark-only -s``; the two
forwards are one benchmark group, and the invariant one records its ratio to a standard forward timed beside
it (``ratio_to_standard``; the goal is under 10×, reported, not gated). Memory:
``pytest profiles/test_invariant_cost.py -m memory -s``: memray's peak of each forward, measured in a child
process (pytest-memray owns this one's tracker under ``--memray``); the mode must stay under 3× the standard peak.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

LAYERS, D_MODEL, HEADS, KV_HEADS, D_FF, VOCAB, TOKENS = 4, 512, 8, 2, 1376, 1024, 512
MEMORY_GOAL = 3.0  # the invariant forward's peak over the standard one's, at most


def build() -> tuple[Any, torch.Tensor]:
    """The model (eval mode, weights from seed 0) and its 512 prompt tokens (1, 512)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=TOKENS,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    tokens = torch.randint(0, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    return model, tokens


def forward(model: Any, tokens: torch.Tensor, kernels: str) -> Callable[[], torch.Tensor]:
    """One uncached forward with the ``"standard"`` or ``"invariant"`` kernels, as a callable."""
    from kvverify.invariant import batch_invariant

    def run() -> torch.Tensor:
        with torch.no_grad(), batch_invariant() if kernels == "invariant" else contextlib.nullcontext():
            return model(tokens, use_cache=False).logits  # type: ignore[no-any-return]

    return run


@pytest.fixture(scope="module")
def llama() -> tuple[Any, torch.Tensor]:
    pytest.importorskip("transformers")
    return build()


def _best(run: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.benchmark(group="invariant-mode")
@pytest.mark.parametrize("kernels", ["standard", "invariant"])
def test_llama_forward_time(benchmark: Any, llama: tuple[Any, torch.Tensor], kernels: str) -> None:
    model, tokens = llama
    run = forward(model, tokens, kernels)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(layers=LAYERS, d_model=D_MODEL, head_dim=D_MODEL // HEADS, tokens=TOKENS)
    if kernels == "invariant":
        standard = _best(forward(model, tokens, "standard"), 3)
        ratio = benchmark.stats.stats.min / standard
        benchmark.extra_info.update(standard_best_s=standard, ratio_to_standard=ratio)
        print(f"\ninvariant forward: best {benchmark.stats.stats.min:.3f} s, standard beside it {standard:.3f} s: "
              f"{ratio:.1f}x")


MEMORY_SCRIPT = """
import json
from kvverify.profiling.hostmem import memray_allocations
from kvverify.reference.threads import torch_threads
from profiles.test_invariant_cost import build, forward
model, tokens = build()
out = {}
with torch_threads(1):
    for kernels in ("standard", "invariant"):
        run = forward(model, tokens, kernels)
        run()  # warm: lazy initialisation is not the forward's memory
        out[kernels] = memray_allocations(run).peak_bytes
print(json.dumps(out))
"""


@pytest.mark.memory
def test_llama_forward_peak_memory() -> None:
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    peaks: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = peaks["invariant"] / peaks["standard"]
    print(f"\nmemray peak of one forward: standard {peaks['standard'] / 2**20:.1f} MiB, "
          f"invariant {peaks['invariant'] / 2**20:.1f} MiB: {ratio:.2f}x")
    assert ratio < MEMORY_GOAL, (
        f"the invariant forward's peak should stay under {MEMORY_GOAL}x the standard one's; got {ratio:.2f}x "
        f"({peaks}). A kernel holds more than its chunk: see kvverify/invariant/ordered.py CHUNK."
    )
