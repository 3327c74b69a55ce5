"""Programs of operations on one llama.cpp context, drawn by Hypothesis so that a failure shrinks.

An operation's arguments are drawn without knowing the state and resolved against it when it runs (a crop keeps
``min(keep, held)``, a load of an empty slot does nothing, a prompt is cut from an earlier sequence), so every drawn
program is valid and a shrunk one stays readable. Prompts are cut from the sequences the program has already seen,
so prefix reuse is the common case, not a coincidence.

Operations (each a frozen dataclass whose ``repr`` is the line a report prints):

- ``Eval(tokens)``: ``Llama.eval`` appends tokens;
- ``Crop(keep)``: ``llama_memory_seq_rm(mem, -1, keep, -1)`` and ``n_tokens = keep`` (``keep < 0``: drop ``-keep``);
- ``Save(slot)`` / ``Load(slot)``: ``Llama.save_state()`` / ``load_state``;
- ``Generate(source, keep, extra, n_new)``: greedy ``Llama.generate(prompt)`` with ``reset=True``, which keeps the
  longest prefix the context holds; the prompt is ``seen[-1 - source][:keep] + extra`` (source 0: the tokens held
  now);
- ``Complete(source, keep, extra, n_new)``: the same prompt through ``Llama.create_completion`` with a
  ``LlamaRAMCache`` set, which restores the cached state of the longest matching prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

#: The vocabulary the programs draw from: a small one makes shared prefixes and repeated tokens likely.
TOKENS = st.integers(min_value=3, max_value=40)  # 0, 1, 2: <unk>, <s>, </s>; </s> would end a completion early
SLOTS = 2


@dataclass(frozen=True)
class Eval:
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Crop:
    keep: int  # tokens kept (at most those held); negative: drop -keep from the end, as kvverify's crop


@dataclass(frozen=True)
class Save:
    slot: int


@dataclass(frozen=True)
class Load:
    slot: int


@dataclass(frozen=True)
class Generate:
    source: int  # which sequence seen: 0 the tokens held now, 1 those held before the last step... (modulo their
    #              number; none yet: the prompt is ``extra`` alone)
    keep: int | None  # tokens of it kept (None: all of it)
    extra: tuple[int, ...]
    n_new: int


@dataclass(frozen=True)
class Complete:
    source: int
    keep: int | None
    extra: tuple[int, ...]
    n_new: int


Operation = Eval | Crop | Save | Load | Generate | Complete
KINDS = ("eval", "crop", "state", "generate", "complete")


def _tokens(min_size: int, max_size: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(TOKENS, min_size=min_size, max_size=max_size).map(tuple)


def operations(kinds: tuple[str, ...], *, max_chunk: int) -> st.SearchStrategy[Operation]:
    """One operation of the given kinds (see :data:`KINDS`); ``max_chunk``: the longest ``Eval`` or ``extra``."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"operation kinds must be some of {KINDS}; got {kinds!r}")
    # prompts aimed at prefix reuse: half of them exactly the tokens held now (source 0, all of it, nothing added),
    # the others cut from any sequence seen, with tokens added
    prompt = dict(source=st.integers(0, 7), keep=st.none() | st.integers(0, 96), extra=_tokens(1, max_chunk),
                  n_new=st.integers(1, 6))
    held = dict(source=st.just(0), keep=st.none(), extra=st.just(()), n_new=st.integers(1, 6))
    choices: list[st.SearchStrategy[Operation]] = []
    if "eval" in kinds:
        choices.append(st.builds(Eval, _tokens(1, max_chunk)))
    if "crop" in kinds:
        choices.append(st.builds(Crop, st.integers(-8, -1) | st.integers(0, 96)))  # half: drop from the end
    if "state" in kinds:
        choices += [st.builds(Save, st.integers(0, SLOTS - 1)), st.builds(Load, st.integers(0, SLOTS - 1))]
    if "generate" in kinds:
        choices += [st.builds(Generate, **held), st.builds(Generate, **prompt)]
    if "complete" in kinds:
        choices += [st.builds(Complete, **held), st.builds(Complete, **prompt)]
    return st.one_of(choices)


def programs(kinds: tuple[str, ...], *, max_ops: int = 8, max_chunk: int = 12) -> st.SearchStrategy[list[Operation]]:
    """A program: 1 to ``max_ops`` operations of the given kinds.

    >>> programs(("eval", "crop")).example()  # doctest: +SKIP
    [Eval(tokens=(5, 9)), Crop(keep=1), Eval(tokens=(7,))]
    """
    return st.lists(operations(kinds, max_chunk=max_chunk), min_size=1, max_size=max_ops)
