"""litgpt's known failures (see :mod:`kvverify.adapters.known_failures`), each with its fixed reproducing example.

- ``litgpt-sliding-chunked-prefill``: litgpt's sliding-window ``KVCache`` (a ring of W slots, since 0.5.12) cannot
  serve an update of more than one token once the ring is full: the chunk's tokens overwrite the slots of the
  oldest tokens, which the chunk's earlier queries still need, and the model's mask (rows of the causal mask cut
  to W columns) then lets every query see every slot, the chunk's later tokens included. Token-by-token decoding is
  exact; a prompt fed in chunks is not, although every chunk fits the window (litgpt 0.5.13 refuses only a chunk
  longer than the window, litgpt#2182 / PR #2215). kvverify's ``sliding_window`` property finds it (minimal case:
  window 3, four tokens fed as [1] then 3), and ``chunked_prefill`` and ``continuation`` too. The fixed example
  runs litgpt alone, its ``GPT`` with ``set_kv_cache``, no kvverify code between them. First affected: 0.5.12,
  which brought the ring. Up to 0.5.11 the cache was a plain buffer and the window a bias laid on the selected
  mask rows by their local index, so cached decoding differed from the uncached forward even token by token (0.21
  in the same example): another bug, of the model's mask rather than of the cache, which this entry does not cover.
"""

from __future__ import annotations

import importlib

import torch

from kvverify.adapters.known_failures import KnownFailure

#: The issue and the pull request that made litgpt refuse a prefill longer than the window (the same class of bug).
RELATED = "https://github.com/Lightning-AI/litgpt/issues/2182 (PR #2215 refuses only a prefill longer than the window)"

#: Past float64 rounding: the chunked logits differ from the uncached ones by 0.1 to 0.3 (1e-16 token by token).
TOLERANCE = 1e-9


def chunked_prefill_logits(window: int, chunks: tuple[int, ...]) -> tuple[float, float]:
    """A one-layer litgpt ``GPT`` in float64 with a sliding window on its layer: the largest logit difference from
    the uncached forward when the prompt is fed token by token, and when it is fed in ``chunks``."""
    litgpt = importlib.import_module("litgpt")
    length = sum(chunks)
    config = litgpt.Config(block_size=16, vocab_size=32, padded_vocab_size=32, n_layer=1, n_head=2, n_query_groups=2,
                           n_embd=16, sliding_window_size=window, sliding_window_indices=[1])
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = litgpt.GPT(config).to(torch.float64).eval()
    tokens = torch.randint(0, 32, (1, length), generator=generator)  # (1, T)
    differences = []
    with torch.no_grad():
        whole = model(tokens)  # (1, T, vocab), no cache
        for plan in ((1,) * length, chunks):
            model.set_kv_cache(batch_size=1, max_seq_length=16, dtype=torch.float64)
            start, parts = 0, []
            for size in plan:
                parts.append(model(tokens[:, start:start + size], input_pos=torch.arange(start, start + size)))
                start += size
            differences.append(float((torch.cat(parts, dim=1) - whole).abs().max()))
            model.clear_kv_cache()
    return differences[0], differences[1]


def sliding_chunked_prefill() -> str | None:
    """Window 3, four tokens fed as [1, 3] (kvverify's shrunk case): the logits must equal the uncached ones."""
    one_by_one, chunked = chunked_prefill_logits(3, (1, 3))
    if one_by_one > TOLERANCE:
        raise RuntimeError(f"token-by-token decoding already differs by {one_by_one:.3g}: not the known failure")
    if chunked <= TOLERANCE:
        return None
    return (f"window 3, prompt of 4 fed in chunks [1, 3]: logits differ from the uncached forward by {chunked:.3g} "
            f"(token by token: {one_by_one:.1g})")


KNOWN: tuple[KnownFailure, ...] = (
    KnownFailure(
        name="litgpt-sliding-chunked-prefill",
        library="litgpt",
        versions=("0.5.12", None),
        cache="litgpt-sliding",
        checks=("chunked_prefill", "sliding_window", "continuation", "stateful"),
        pattern=r"update\(\) returned \d+ slots; with a sliding window of \d+ and \d+ new tokens the queries need "
                r"the newest \d+",
        summary="the sliding-window ring KVCache loses the keys a multi-token chunk's earlier queries need once "
                "it is full (chunked prefill wrong although every chunk fits the window)",
        reproduce=sliding_chunked_prefill,
        related=RELATED,
    ),
)
