"""``python -m kvverify.adapters.hf [fp8|quanto|hqq]``: a quantized cache's logit error on the reference model's
tiny presets (the group-wise backends also at head_dim 2 and 4)."""

from __future__ import annotations

import itertools
import statistics
import sys

import torch

from kvverify.adapters.hf.caches import CACHES, FACTORIES, quantized_cache
from kvverify.engine.generation import generate
from kvverify.protocol.cache import CacheFactory
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel


def measure_lossy_error(factory: CacheFactory, *, seeds: int = 3, new_tokens: int = 24,
                        head_dims: tuple[int, ...] = (8,)) -> tuple[float, float, int]:
    """The largest and the median cached/uncached logit difference of a lossy cache factory over tiny
    reference models of every shape the suite draws, each row compared up to its first differing token."""
    errors: list[float] = []
    shapes = itertools.product(
        (4, 2, 1), (None, 5), ("rope", "alibi", "learned", "none"), (torch.float32, torch.float64),
        ("strict", "fast"), range(seeds), head_dims,
    )
    for n_kv_heads, window, positional, dtype, numerics, seed, head_dim in shapes:
        config = ModelConfig.preset(
            "tiny", n_kv_heads=n_kv_heads, sliding_window=window, positional=positional, dtype=dtype,
            numerics=numerics, max_seq_len=64, head_dim=head_dim,
        )
        model = ReferenceModel(config, seed=seed)
        prompt = torch.randint(0, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(prompt)
        mask[1, :2], mask[2, :5] = 0, 0  # left padding
        ref = model.generate(prompt, new_tokens, use_cache=False, attention_mask=mask)
        out = generate(model, prompt, new_tokens, cache=factory(config), attention_mask=mask)
        for row in range(prompt.shape[0]):
            differ = (out.tokens[row] != ref.tokens[row]).nonzero()
            last = int(differ[0]) if len(differ) else new_tokens - 1
            errors.append(float((out.logits[row, : last + 1] - ref.logits[row, : last + 1]).abs().max()))
    return max(errors), statistics.median(errors), len(errors)


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "fp8"
    if backend == "fp8":
        worst, median, rows = measure_lossy_error(quantized_cache)
    else:  # the group-wise backends, at the suite's small head dims
        worst, median, rows = measure_lossy_error(FACTORIES[backend], seeds=1, head_dims=(2, 4, 8))
    print(f"{backend} QuantizedCache: max logit difference {worst:.3g}, median {median:.3g} over {rows} rows; "
          f"declared atol {CACHES[backend].atol}")
