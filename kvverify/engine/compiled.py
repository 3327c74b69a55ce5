"""The decode step compiled, in the style of gpt-fast's ``generate.py``: the position is a tensor
(``input_pos``), the cache a static buffer written in place, and ``torch.compile(..., fullgraph=True,
dynamic=False)`` turns one decoded token into one graph (inductor's C++ kernels on the CPU), which on CUDA is
then captured once and replayed every step (:mod:`kvverify.engine.graphs`).

:class:`PositionStep` is :class:`~kvverify.engine.decode.DecodeStep` with the position as a (1,) tensor: a
Python int would be a constant of the graph, and a new graph every step. It masks by slot (slot i holds token i,
as a static buffer does) instead of cutting the returned keys, so the shapes stay those of the buffer.
:class:`CompileCounter` is a backend that counts the graphs it is handed (a recompile is a new graph).
:class:`CompiledStep` is that step assembled once: compiled, and replayed from a CUDA graph per cache and batch on
CUDA; the profiles drive it with caches of their own. :class:`CompiledDecoder` is the engine: prefill through the
eager model, decode through a :class:`CompiledStep` over its own static cache.
The eager :class:`~kvverify.engine.decode.DecodeStep` stays the reference these are compared with.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from kvverify.caches.static import StaticCache
from kvverify.engine.decode import DecodeStep, Keys
from kvverify.engine.graphs import GraphedStep
from kvverify.protocol.cache import KVCache
from kvverify.reference.model import ReferenceModel

#: ``step(tokens (B, 1), cache, input_pos (1,) long) -> logits (B, vocab)``
PositionFn = Callable[[torch.Tensor, KVCache, torch.Tensor], torch.Tensor]
#: What :func:`compile_step` takes and returns: ``PositionFn``, or a step that also returns its greedy choice.
StepT = TypeVar("StepT", bound=Callable[..., Any])


class PositionStep(DecodeStep):
    """:meth:`at` decodes a token at slot ``input_pos`` (a (1,) long tensor on the model's device) of every row,
    equal to ``DecodeStep(weights)(tokens, cache, int(input_pos))`` up to rounding for a cache that returns a
    buffer whose slot i holds token i (a static cache) or exactly the tokens written."""

    def at(self, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
        window = self._window
        x = self._embeddings.index_select(0, tokens.view(tokens.shape[0]))  # (B, d_model), a new tensor
        if self._positions is not None:
            x = x + self._positions.index_select(0, input_pos)  # (1, d_model)
        rope = None
        if self._rope is not None:
            rope = self._rope[0].index_select(0, input_pos), self._rope[1].index_select(0, input_pos)  # (1, D)

        def visible(k: torch.Tensor, v: torch.Tensor) -> Keys:
            slots = torch.arange(k.shape[-2], device=k.device)  # (S,): slot i holds token i
            seen = slots <= input_pos
            if window is not None:  # the query sees the newest `window` tokens only
                seen = seen & (slots > input_pos - window)
            return k, v, seen.view(1, 1, 1, -1)  # (1, 1, 1, S)

        return self.blocks(x, cache, input_pos, rope, visible)

    def choose(
        self, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`at` and the greedy choice after it: logits (B, vocab) and the next tokens (B, 1), so that a
        compiled step is the whole of a greedy decode step, argmax included."""
        logits = self.at(tokens, cache, input_pos)
        return logits, logits.argmax(-1, keepdim=True)


class CompileCounter:
    """A ``torch.compile`` backend that counts the graphs dynamo hands it, then compiles them with ``inner``
    (``"eager"``: runs the captured graph as it is, the cheapest way to see graph breaks and recompiles).
    Each compilation of a frame hands over one graph per piece between graph breaks; a recompile is a new one."""

    def __init__(self, inner: str = "eager") -> None:
        self.inner = inner
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        if self.inner == "eager":
            return graph.forward
        from torch._dynamo.backends.registry import lookup_backend

        compiled: Callable[..., Any] = lookup_backend(self.inner)(graph, example_inputs)
        return compiled


def compile_step(fn: StepT, counter: CompileCounter | str, *, fullgraph: bool = True) -> StepT:
    """``fn`` under ``torch.compile`` with ``counter`` (or a backend's name) as its backend, static shapes
    (``dynamic=False``: a new shape is a recompile, which a counter sees) and, by default, one graph or an error
    at a graph break."""
    return cast(StepT, torch.compile(fn, backend=counter, fullgraph=fullgraph, dynamic=False))


def own_code(step: PositionStep, method: str = "at") -> Callable[..., Any]:
    """``step.at`` (or another of its methods) on a copy of its code object. dynamo caches compiled code, and
    counts recompiles against its limit (8), per code object: a process holding decoders of many shapes would
    otherwise hit that limit."""
    function = getattr(PositionStep, method)
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(copy, step)


class CompiledStep:
    """The compiled one-token decode of ``model`` (a :class:`PositionStep` for ``max_len`` slots through
    :func:`compile_step` with ``backend``, a compiler's name or a :class:`CompileCounter`), replayed from a CUDA
    graph when ``cuda_graphs`` (default: on CUDA). A graph replays on the buffers it was captured with, so graphs
    are kept per batch for one cache at a time: a new cache drops the old one's.

    ``step(tokens (B, 1), cache, input_pos (1,) long) -> logits (B, vocab)``, cache a static one of ``max_len``
    slots."""

    def __init__(self, model: ReferenceModel, max_len: int, *, backend: CompileCounter | str = "inductor",
                 cuda_graphs: bool | None = None) -> None:
        self.step = PositionStep(model.weights(), max_len)  # raises for strict numerics or ALiBi
        self.counter = backend if isinstance(backend, CompileCounter) else CompileCounter(backend)
        self.use_graphs = torch.device(model.config.device).type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphed: dict[tuple[int, int], GraphedStep] = {}  # by (cache, batch): a capture has fixed buffers
        self._decode: PositionFn = compile_step(own_code(self.step), self.counter)
        self._choose: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # compiled on first use

    def choose(
        self, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step and the greedy choice in one compiled graph (without a CUDA graph): logits (B, vocab) and the
        next tokens (B, 1)."""
        if self._choose is None:
            self._choose = compile_step(own_code(self.step, "choose"), self.counter)
        return self._choose(tokens, cache, input_pos)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
        if not self.use_graphs:
            return self._decode(tokens, cache, input_pos)
        key = (id(cache), tokens.shape[0])
        if key not in self.graphed:
            if any(held != id(cache) for held, _ in self.graphed):
                self.graphed.clear()  # one cache at a time: a loop that builds a fresh cache per round
            self.graphed[key] = GraphedStep(self._decode, cache, tokens, input_pos)
        return self.graphed[key](tokens, input_pos)


class CompiledDecoder:
    """gpt-fast's decode loop over a reference model (fast numerics): a :class:`~kvverify.caches.StaticCache`
    of ``batch_size`` rows and ``max_len`` slots, filled by the eager model's prefill; then one
    :class:`CompiledStep` per token (captured in a CUDA graph and replayed on CUDA: ``cuda_graphs``, default: on
    CUDA). ``backend``: the compiler (default inductor), e.g. ``"eager"`` to test without C++ compilation.

    Build it once and call :meth:`generate` many times: the first calls compile (seconds), the rest reuse.
    """

    def __init__(
        self,
        model: ReferenceModel,
        *,
        max_len: int,
        batch_size: int = 1,
        backend: str = "inductor",
        cuda_graphs: bool | None = None,
    ) -> None:
        config = model.config
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {config.max_seq_len}; expected at "
                             "most that (build the model with a larger max_seq_len).")
        self.model, self.max_len, self.batch_size = model, max_len, batch_size
        self.compiled = CompiledStep(model, max_len, backend=backend, cuda_graphs=cuda_graphs)
        self.counter = self.compiled.counter
        self.cache = StaticCache(
            n_layers=config.n_layers, max_batch_size=batch_size, n_kv_heads=config.n_kv_heads, max_seq_len=max_len,
            head_dim=config.head_dim, dtype=config.dtype, device=config.device,
        )  # fmt: skip

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One token per row at slot ``input_pos`` (1,): logits (B, vocab), through the CUDA graph when on."""
        return self.compiled(tokens, self.cache, input_pos)

    def decode_and_choose(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` and the greedy choice: logits (B, vocab) and the next tokens (B, 1). Without CUDA graphs
        the argmax is inside the compiled graph; with them, after the replay."""
        if self.compiled.use_graphs:
            logits = self.decode(tokens, input_pos)
            return logits, logits.argmax(-1, keepdim=True)
        return self.compiled.choose(tokens, self.cache, input_pos)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy generation without padding: tokens (B, N) and the logits that chose them (B, N, vocab), as
        ``ReferenceModel.generate(prompt, N)`` gives up to rounding. prompt: (B, T) long, T + N <= max_len."""
        batch, length = prompt.shape
        if batch > self.batch_size or length + max_new_tokens > self.max_len:
            raise ValueError(
                f"a prompt of {batch} x {length} tokens and {max_new_tokens} new ones does not fit this decoder "
                f"({self.batch_size} rows, {self.max_len} slots); build one with a larger batch_size or max_len."
            )
        self.cache.reset()  # each call starts from an empty cache: the buffers stay, so the captured graphs do
        logits = self.model(prompt, cache=self.cache, last_only=True)[:, -1]  # (B, vocab), eager prefill
        chosen, chosen_logits = [], []
        position = torch.full((1,), length, dtype=torch.long, device=prompt.device)
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        for step in range(max_new_tokens):
            chosen.append(token)
            chosen_logits.append(logits)
            if step + 1 < max_new_tokens:
                logits, token = self.decode_and_choose(token, position)
                position += 1
        return torch.cat(chosen, dim=1), torch.stack(chosen_logits, dim=1)
