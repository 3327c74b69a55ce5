"""The eviction oracle: a cache that keeps a subset of its tokens (``CacheDeclaration(keeps=Eviction(...))``)
checked against the reference attending to exactly the tokens it kept, at their original positions.

One generation runs through the cache under test, recording before every ``update`` the slots each layer held
(``kept_positions``); then, in order:

1. the slots are well formed: ``(B, Hkv, S)`` long, distinct per head, tokens already written;
2. after the prefill each head holds ``Eviction.n_kept(prompt length)`` prompt tokens, and every token written
   since; the same prompt tokens stay until the end;
3. the kept set follows the declared rule, on the *recomputed* keys: StreamingLLM's sinks and window exactly,
   Knorm's smallest key norms (up to ties), or only the count (``"count"``);
4. the generation ≡ the reference model through :class:`~kvverify.reference.eviction.SubsetReplayCache` told
   the same slots: bit for bit in strict numerics. A cache that kept the right tokens but changed them (rerotated
   keys, shifted positions) differs here;
5. a second call (``continuation``: a new turn appended to what was generated, then more tokens from the
   returned cache) is held to the same: no second compression, every token since the prefill kept, the
   positions continuing from the tokens seen;
6. ``get_seq_length()`` counts the tokens seen, not kept (the model checks it before every forward, and the
   contract after every call): the next token's position, as for a sliding window.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.checks.case import Case
from kvverify.checks.property import expect_same, join
from kvverify.checks.target import Target
from kvverify.engine.generation import generate
from kvverify.protocol.cache import KVCache
from kvverify.protocol.eviction import Eviction
from kvverify.reference.eviction import SubsetReplayCache, key_norm_violations, sinks_and_window


class EvictionMismatch(AssertionError):
    """The kept slots are malformed, too many or too few, or not the ones the declared rule keeps."""


@dataclass(frozen=True)
class _Call:
    """One ``update``: its layer, what it was given and what it returned, (B, Hkv, T or S, D) each."""

    layer: int
    given: tuple[torch.Tensor, torch.Tensor]
    returned: tuple[torch.Tensor, torch.Tensor]


class _Logged:
    """A cache, with every ``update`` it served."""

    def __init__(self, inner: KVCache) -> None:
        self.inner = inner
        self.calls: list[_Call] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.update(key_states, value_states, layer_idx, cache_kwargs)
        # copies: a cache may return views of a buffer it writes in place later
        self.calls.append(_Call(layer_idx, (key_states, value_states), (keys.clone(), values.clone())))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.get_seq_length(layer_idx))


class _Recording(_Logged):
    """The cache under test, with the slots each layer held before each of its updates."""

    def __init__(self, inner: KVCache, n_layers: int) -> None:
        super().__init__(inner)
        self.held: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.before: list[list[int]] = [[] for _ in range(n_layers)]  # tokens written before each update
        self.written = [0] * n_layers

    def kept(self, layer_idx: int, like: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S) long: the slots the layer holds now (none before its first update)."""
        if self.written[layer_idx] == 0:
            return torch.zeros(*like.shape[:2], 0, dtype=torch.long, device=like.device)
        reader = getattr(self.inner, "kept_positions", None)
        if not callable(reader):
            raise EvictionMismatch("the cache declares keeps={...} but has no kept_positions(layer_idx); expected "
                                   "a method returning the slot of each token it holds, (batch, n_kv_heads, S) long")
        slots = reader(layer_idx)
        expected = (*like.shape[:2],)
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.long or slots.dim() != 3 \
                or tuple(slots.shape[:2]) != expected:
            shown = (f"{tuple(slots.shape)} {slots.dtype}" if isinstance(slots, torch.Tensor)
                     else type(slots).__name__)
            raise EvictionMismatch(f"kept_positions({layer_idx}) returned {shown}; expected a long tensor "
                                   f"({expected[0]}, {expected[1]}, S): the slot of each token held")
        return slots.to(like.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.kept(layer_idx, key_states)
        _check_slots(held, self.written[layer_idx], f"before update {len(self.held[layer_idx]) + 1} of layer "
                                                     f"{layer_idx}")
        self.held[layer_idx].append(held)
        self.before[layer_idx].append(self.written[layer_idx])
        result = super().update(key_states, value_states, layer_idx, cache_kwargs)
        self.written[layer_idx] += key_states.shape[-2]
        return result


def _check_slots(slots: torch.Tensor, written: int, when: str) -> None:
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= written):
        raise EvictionMismatch(f"kept_positions {when} holds slot {int(slots.min())}..{int(slots.max())}, but only "
                               f"slots 0..{written - 1} were written")
    ordered = slots.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise EvictionMismatch(f"kept_positions {when} holds a slot twice in one head: {slots.tolist()}")


def _check_counts(eviction: Eviction, states: list[tuple[torch.Tensor, int]], prompt: int,
                  layer: int) -> torch.Tensor:
    """The prompt slots kept after the prefill, (B, Hkv, n_kept) ascending, checked against the declared count
    and against every later state: ``states`` holds (slots held, tokens written) after the prefill and after
    each later update; tokens written after the prefill are all kept."""
    n_kept = eviction.n_kept(prompt)
    kept = states[0][0].sort(dim=-1).values
    if kept.shape[-1] != n_kept or bool((kept >= prompt).any()):
        raise EvictionMismatch(
            f"layer {layer} holds {kept.shape[-1]} slots after a prefill of {prompt} tokens; expected "
            f"n_kept = {n_kept} prompt tokens per KV head ({eviction}): slots held {kept.tolist()}")
    for state, written in states[1:]:
        since = torch.arange(prompt, written, device=kept.device).expand(*kept.shape[:2], written - prompt)
        expected = torch.cat((kept, since), dim=-1)
        if not torch.equal(state.sort(dim=-1).values, expected):
            raise EvictionMismatch(
                f"layer {layer}, {written - prompt} token(s) after the prefill: holds slots "
                f"{state.sort(dim=-1).values.tolist()}, expected the prefill's kept ones and every token since: "
                f"{expected.tolist()}")
    return kept


def _check_rule(eviction: Eviction, kept: torch.Tensor, keys: torch.Tensor, layer: int) -> None:
    """kept (B, Hkv, n_kept) ascending; keys (B, Hkv, prompt, D), recomputed."""
    if eviction.rule == "sinks_window":
        expected = sinks_and_window(eviction, keys.shape[-2]).to(kept.device)
        if not bool((kept == expected).all()):
            raise EvictionMismatch(f"layer {layer} kept slots {kept.tolist()}; {eviction} keeps the first "
                                   f"{eviction.n_sink} and the newest: {expected.tolist()} in every head")
    elif eviction.rule == "smallest_key_norm":
        broken = key_norm_violations(keys, kept)
        if broken:
            raise EvictionMismatch(f"layer {layer}: the kept keys are not the smallest by L2 norm ({eviction}); "
                                   + "; ".join(broken[:3]))


def _first_difference(actual: _Recording, expected: _Logged) -> str:
    """Where the cache first returned a key or value that differs from the recomputed one of the position it
    says it holds, in an update whose inputs were still the same on both sides; "" when none did."""
    seen = [0] * len(actual.held)
    for mine, theirs in zip(actual.calls, expected.calls, strict=False):
        layer, update = mine.layer, seen[mine.layer]
        seen[layer] += 1
        if mine.layer != theirs.layer or not all(torch.equal(a, b) for a, b in zip(mine.given, theirs.given,
                                                                                      strict=True)):
            return ""  # the inputs diverged first: an earlier layer's attention differed
        held = actual.held[layer][update]  # (B, Hkv, S_held)
        for what, got, want in zip(("key", "value"), mine.returned, theirs.returned, strict=True):
            if got.shape != want.shape:
                return (f"layer {layer}, update {update + 1}: the cache returned {tuple(got.shape)} {what}s, "
                        f"the {held.shape[-1]} slots it held and the new tokens make {tuple(want.shape)}")
            differs = got != want  # (B, Hkv, S, D)
            if bool(differs.any()):
                b, h, i, _ = (int(x) for x in torch.nonzero(differs)[0])
                position = int(held[b, h, i]) if i < held.shape[-1] else None
                token = (f"slot {i}, which kept_positions says holds position {position}" if position is not None
                         else f"slot {i}, a new token")
                error = float((got[b, h, i].double() - want[b, h, i].double()).abs().max())
                return (f"layer {layer}, update {update + 1}, batch row {b}, KV head {h}, {token}: the cached "
                        f"{what} differs from the recomputed one of that position, max abs {error:.3g}")
    return ""


def check_evicted(target: Target, case: Case, eviction: Eviction,
                  then: tuple[torch.Tensor, int] | None = None) -> None:
    """Generation through the compressing cache ≡ the reference attending to the tokens it kept; the kept
    tokens follow the declared rule (see the module's docstring). ``then``: (extra (B, E) tokens, more): append
    them to what was generated and generate ``more`` from the returned cache (a new turn, a second call)."""
    model = case.model()
    prompt, mask = case.tokens(), case.attention_mask()
    recording = _Recording(target.new_cache(case.config), case.config.n_layers)
    calls = [(prompt, case.max_new_tokens, mask)]
    actual = [generate(model, prompt, case.max_new_tokens, cache=recording, attention_mask=mask)]
    if then is not None:
        extra, more = then
        sequences = torch.cat((actual[0].sequences, extra), dim=1)
        following = torch.cat((actual[0].attention_mask, torch.ones_like(extra)), dim=1)
        calls.append((sequences, more, following))
        actual.append(generate(model, sequences, more, cache=recording, attention_mask=following))
    like = prompt.new_zeros(case.batch, case.config.n_kv_heads)
    kept = []
    for layer in range(case.config.n_layers):
        final = recording.kept(layer, like)
        _check_slots(final, recording.written[layer], f"after the generation, layer {layer}")
        states = [*zip(recording.held[layer][1:], recording.before[layer][1:], strict=True),
                  (final, recording.written[layer])]
        kept.append(_check_counts(eviction, states, case.prompt_len, layer))
    replay = SubsetReplayCache(recording.held)
    logged = _Logged(replay)
    expected = [generate(model, tokens, n, cache=logged, attention_mask=m) for tokens, n, m in calls]
    for layer in range(case.config.n_layers):
        _check_rule(eviction, kept[layer], replay.keys[layer][:, :, :case.prompt_len], layer)
    where = _first_difference(recording, logged)  # "" unless a returned key or value differs
    expect_same(target, case, functools.reduce(join, expected), functools.reduce(join, actual),
                "cached generation differs from the reference attending to exactly the tokens the cache kept, at "
                f"their original positions{f' ({where})' if where else ''}", label="generation over the kept tokens")
