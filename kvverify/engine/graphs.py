"""A decode step captured once in a CUDA graph and replayed for every later token (what compile's
``reduce-overhead`` mode does, written out so that what is captured is plain).

A replay reruns the captured kernels on the captured addresses: the inputs must be copied into the same static
tensors every step, and the cache must keep its buffers where they were at capture. A cache that reallocates a
buffer (to grow it, or on reset) leaves the graph reading and writing the old one: stale keys, silently. On a
CPU there is no graph; :class:`GraphedStep` then calls the step on its static inputs, so the copying is the same
code on both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvverify.protocol.cache import KVCache

#: Untimed calls on a side stream before a capture: lazy allocations (workspaces, a cache's counters) happen there.
WARMUP_CALLS = 2


class GraphedStep:
    """``graphed(tokens (B, 1), input_pos (1,)) -> logits (B, vocab)`` for ``step(tokens, cache, input_pos)``.

    Built from example ``tokens`` and ``input_pos`` (their shapes and device are the graph's). On CUDA it warms
    ``step`` up on a side stream and captures one call (both write to ``cache``: at the example position, which the
    first replay overwrites); every call then copies its inputs into the static ones and replays. Elsewhere each
    call runs ``step`` on the static inputs. The logits returned are a fresh copy.
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, KVCache, torch.Tensor], torch.Tensor],
        cache: KVCache,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
    ) -> None:
        self.step, self.cache = step, cache
        self.tokens, self.input_pos = tokens.clone(), input_pos.clone()  # the static inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the static output, once captured
        if tokens.device.type == "cuda":
            self._capture()

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.tokens.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.tokens.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.step(self.tokens, self.cache, self.input_pos)
        torch.cuda.current_stream(self.tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.tokens, self.cache, self.input_pos)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"a graph captured for tokens of shape {tuple(self.tokens.shape)} was given "
                             f"{tuple(tokens.shape)}; capture another for that batch.")
        self.tokens.copy_(tokens)
        self.input_pos.copy_(input_pos)
        if self.graph is None:
            return self.step(self.tokens, self.cache, self.input_pos).clone()
        self.graph.replay()
        assert self.logits is not None
        return self.logits.clone()
