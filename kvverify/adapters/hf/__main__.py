"""``python -m kvverify.adapters.hf``: the fp8 cache's logit error on the reference model's tiny presets."""

from __future__ import annotations

import itertools
import statistics

import torch

from kvverify.adapters.hf.caches import FP8_ATOL, quantized_cache
from kvverify.protocol import CacheFactory
from kvverify.reference.config import ModelConfig
from kvverify.reference.model import ReferenceModel


def measure_lossy_error(factory: CacheFactory, *, seeds: int = 3, new_tokens: int = 24) -> tuple[float, float]:
    """The largest and the median cached/uncached logit difference of a lossy cache factory over tiny
    reference models of every shape the suite draws, each row compared up to its first differing token."""
    errors: list[float] = []
    shapes = itertools.product(
        (4, 2, 1), (None, 5), ("rope", "alibi", "learned", "none"), (torch.float32, torch.float64),
        ("strict", "fast"), range(seeds),
    )
    for n_kv_heads, window, positional, dtype, numerics, seed in shapes:
        config = ModelConfig.preset(
            "tiny", n_kv_heads=n_kv_heads, sliding_window=window, positional=positional, dtype=dtype,
            numerics=numerics, max_seq_len=64,
        )
        model = ReferenceModel(config, seed=seed)
        prompt = torch.randint(0, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(prompt)
        mask[1, :2], mask[2, :5] = 0, 0  # left padding
        ref = model.generate(prompt, new_tokens, use_cache=False, attention_mask=mask)
        out = model.generate(prompt, new_tokens, cache=factory(config), attention_mask=mask)
        for row in range(prompt.shape[0]):
            differ = (out.tokens[row] != ref.tokens[row]).nonzero()
            last = int(differ[0]) if len(differ) else new_tokens - 1
            errors.append(float((out.logits[row, : last + 1] - ref.logits[row, : last + 1]).abs().max()))
    return max(errors), statistics.median(errors)


if __name__ == "__main__":
    worst, median = measure_lossy_error(quantized_cache)
    print(f"fp8 QuantizedCache: max logit difference {worst:.3g}, median {median:.3g}; declared FP8_ATOL={FP8_ATOL}")
