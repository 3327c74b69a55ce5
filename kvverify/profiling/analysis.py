"""The analytical model of the KV cache's space-for-time trade: bytes held and FLOPs per generated token.

The usual back-of-the-envelope statement of the trade counts elements for multi-head attention: with a
cache, ``2 * hidden_size * num_layers * decoder_length`` elements per sequence; without, ``2 * hidden_size *
1 * decoder_length`` (:func:`hidden_size_formula_elements`). Generalized for grouped-query and multi-query
attention, batch and dtype, the cache holds::

    KV bytes = 2 × n_layers × n_kv_heads × head_dim × seq_len × batch × bytes per element

(``n_kv_heads × head_dim == hidden_size`` only for multi-head attention). A sliding window of W caps
``seq_len`` at W; a paged cache rounds ``seq_len`` up to whole blocks; a preallocated cache holds its whole
capacity whatever the length.

What of that estimate's "without cache" figure holds: the uncached step keeps no K/V between steps, but its
peak is not ``2 * hidden_size * decoder_length``. Recomputing the prefix materializes, in every layer, the K/V of
the whole prefix *and* the activations of every prefix position (queries, MLP hidden states), and eager
attention builds a ``heads × t × t`` score matrix, which outgrows the cache's bytes once ``t`` exceeds a few
hundred tokens. :func:`uncached_peak_bytes` estimates that peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvverify.protocol.config import ModelConfig

#: How a cache lays out its memory, which decides what it holds at a given length.
Layout = Literal["exact", "window", "paged", "preallocated", "preallocated-rows"]
LAYOUTS: tuple[str, ...] = ("exact", "window", "paged", "preallocated", "preallocated-rows")


def bytes_per_element(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype`` (4 for float32, 2 for bfloat16)."""
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes(
    config: ModelConfig,
    seq_len: int,
    *,
    batch: int = 1,
    window: int | None = None,
    block_size: int | None = None,
) -> int:
    """Bytes of keys and values for ``seq_len`` tokens of ``batch`` sequences: the formula above.

    ``window`` caps the tokens kept at W; ``block_size`` rounds them up to whole blocks.
    >>> kv_bytes(ModelConfig.preset("bench"), 512)  # 2 × 4 layers × 2 heads × 32 × 512 × 4 bytes
    1048576
    """
    if seq_len < 0 or batch < 1:
        raise ValueError(f"seq_len must be >= 0 and batch >= 1; got seq_len={seq_len}, batch={batch}.")
    tokens = seq_len if window is None else min(seq_len, window)
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}.")
        tokens = -(-tokens // block_size) * block_size
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_element(config.dtype)
    return per_token * tokens * batch


def hidden_size_formula_elements(config: ModelConfig, seq_len: int, *, cached: bool) -> int:
    """The usual estimate's element counts per sequence: ``2 * hidden_size * num_layers * decoder_length`` with the
    cache, ``2 * hidden_size * 1 * decoder_length`` without. Exact for multi-head attention only."""
    return 2 * config.d_model * (config.n_layers if cached else 1) * seq_len


def predicted_cache_bytes(
    layout: Layout,
    config: ModelConfig,
    seq_len: int,
    *,
    batch: int = 1,
    block_size: int = 4,
) -> int:
    """What a cache of the given layout holds after ``seq_len`` tokens of ``batch`` sequences.

    exact: the formula; window: the formula capped at ``config.sliding_window`` (``max_seq_len`` without one),
    for every batch row; paged: a pool of ``max_batch_size × ceil(max_seq_len / block_size)`` blocks allocated
    up front; preallocated: ``max_batch_size × max_seq_len`` tokens allocated up front; preallocated-rows:
    ``batch × max_seq_len`` tokens, allocated at the first update for the batch it brings.
    """
    if layout == "exact":
        return kv_bytes(config, seq_len, batch=batch)
    if layout == "window":
        return kv_bytes(config, seq_len, batch=batch, window=config.sliding_window or config.max_seq_len)
    if layout == "paged":
        blocks_per_row = -(-config.max_seq_len // block_size)
        return kv_bytes(config, blocks_per_row * block_size, batch=config.max_batch_size)
    if layout == "preallocated":
        return kv_bytes(config, config.max_seq_len, batch=config.max_batch_size)
    if layout == "preallocated-rows":
        return kv_bytes(config, config.max_seq_len, batch=batch)
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")


def matmul_params(config: ModelConfig) -> int:
    """Weights every token is multiplied by: Q, K, V, O, the SwiGLU MLP in every layer, and the LM head."""
    c = config
    attention = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model
    mlp = 3 * c.d_model * c.d_ff
    return c.n_layers * (attention + mlp) + c.d_model * c.vocab_size


def attention_flops(config: ModelConfig, queries: int, keys: int) -> int:
    """Scores (q·k) and the weighted sum of values for ``queries × keys`` pairs in every layer and head."""
    return 4 * config.n_layers * config.n_heads * config.head_dim * queries * keys


@dataclass(frozen=True)
class StepFlops:
    """FLOPs to generate the token after a context of ``context`` tokens."""

    context: int
    cached: int  # one new token: projections for it, attention against `context` cached keys
    uncached: int  # the whole prefix again: projections for every token, a full context × context score matrix

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.cached / self.uncached


def flops_per_token(config: ModelConfig, context: int) -> StepFlops:
    """Multiply-adds count 2 FLOPs. Uncached, SDPA and eager attention compute every ``t × t`` score and mask
    half of them, so the attention term is counted in full; the LM head runs on the last position only.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1; got {context}.")
    head = 2 * config.d_model * config.vocab_size
    per_token_body = 2 * matmul_params(config) - head
    cached = per_token_body + head + attention_flops(config, 1, context)
    uncached = context * per_token_body + head + attention_flops(config, context, context)
    return StepFlops(context=context, cached=cached, uncached=uncached)


def eager_scores_bytes(config: ModelConfig, seq_len: int, *, batch: int = 1) -> int:
    """One layer's ``batch × heads × t × t`` attention scores (eager attention keeps scores and probabilities)."""
    return batch * config.n_heads * seq_len * seq_len * bytes_per_element(config.dtype)


def prefix_activation_bytes(config: ModelConfig, seq_len: int, *, batch: int = 1) -> int:
    """The widest set of one layer's activations for ``seq_len`` positions: the residual stream, Q/K/V, and the
    gate and up projections with their product (the MLP is the widest part)."""
    c = config
    width = c.d_model + (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.d_ff
    return batch * seq_len * width * bytes_per_element(c.dtype)


def uncached_peak_bytes(config: ModelConfig, seq_len: int, *, batch: int = 1, eager: bool = True) -> int:
    """Estimate of the transient memory of one uncached step at ``seq_len``: the prefix activations, plus
    (eager) a score matrix and its softmax. This is what the usual ``2 * hidden_size * decoder_length`` leaves out."""
    scores = 2 * eager_scores_bytes(config, seq_len, batch=batch) if eager else 0
    return prefix_activation_bytes(config, seq_len, batch=batch) + scores
