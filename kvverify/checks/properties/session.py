"""A cache under test driven side by side with a trivially correct model of it.

The model is the token sequence itself: after every append the expected keys, values and logits come from one
uncached-style prefill of the whole sequence into the oracle's own cache
(:class:`~kvverify.reference.default_cache.ReferenceCache`). Contents are compared by the protocol's S vs N rule
(:class:`kvverify.protocol.KVCache`); lengths after every operation; logits after every append.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kvverify.checks.cropping import CROP_REFUSALS, crop_argument, crop_convention
from kvverify.checks.property import as_generation, expect_same_for
from kvverify.checks.target import Target
from kvverify.protocol.cache import KVCache, resolve_crop, written_slots
from kvverify.reference.default_cache import ReferenceCache
from kvverify.reference.model import ReferenceModel

KeysValues = tuple[torch.Tensor, torch.Tensor]


class RecordingCache:
    """Passes updates through to a cache and keeps what each layer's last update returned."""

    def __init__(self, inner: KVCache) -> None:
        self.inner = inner
        self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.update(key_states, value_states, layer_idx, cache_kwargs)
        self.returned[layer_idx] = (keys, values)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx)


class Session:
    """The target's cache and the sequence it should hold: (B, N) tokens and their attention mask."""

    def __init__(self, target: Target, model: ReferenceModel, batch: int) -> None:
        self.target, self.model, self.config = target, model, model.config
        self.cache = target.new_cache(self.config)
        device = self.config.device
        self.tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.log: list[str] = []
        self.last_change = "none"  # the last operation that changed what the cache should hold
        self.side = ""  # which session of a fork this is, in its comparisons' labels ("": the one that goes on)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def room(self) -> int:
        return self.config.max_seq_len - self.length

    def _expect_lengths(self, what: str) -> None:
        for layer in range(self.config.n_layers):
            length = self.cache.get_seq_length(layer)
            assert length == self.length, (
                f"after {what}: get_seq_length({layer}) is {length!r}, expected {self.length} "
                f"({self._history()})"
            )

    def append(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Feed (B, T) tokens (mask: (B, T), ones when None); compare logits and every layer's contents."""
        mask = torch.ones_like(tokens) if mask is None else mask
        start = self.length
        sequence, full_mask = torch.cat((self.tokens, tokens), dim=1), torch.cat((self.mask, mask), dim=1)
        before = self._history()
        self.log.append(f"append {tokens.shape[1]} tokens at {start}")
        recording = RecordingCache(self.cache)
        logits = self.model(tokens, cache=recording, start=start, attention_mask=full_mask)
        expected_cache = ReferenceCache()
        expected = self.model(sequence, cache=expected_cache, attention_mask=full_mask)[:, start:]
        what = f"before this append: {before}"
        exact = self.target.tolerance(self.config) is None  # a lossy cache's contents are only judged by logits
        for layer, returned in recording.returned.items() if exact else ():  # contents first: they say more
            self._expect_contents(layer, returned, (expected_cache.keys[layer], expected_cache.values[layer]), what)
        expect_same_for(self.target, self.config, as_generation(expected), as_generation(logits),
                        f"logits of the last append differ from a prefill of the whole sequence ({what})",
                        label=f"{self.side}append {len(self.log)}")
        self.tokens, self.mask = sequence, full_mask
        self.last_change = self.log[-1]
        self._expect_lengths(self.log[-1])

    def _expect_contents(self, layer: int, returned: KeysValues, every: KeysValues, what: str) -> None:
        """``returned``: what the layer's last update returned; ``every``: keys and values of all N tokens,
        (B, Hkv, N, D)."""
        batch, heads, total, dim = every[0].shape
        for name, got in zip(("keys", "values"), returned, strict=True):
            assert got.dim() == 4 and (got.shape[0], got.shape[1], got.shape[3]) == (batch, heads, dim), (
                f"layer {layer} returned {name} of shape {tuple(got.shape)}; the protocol needs "
                f"(batch={batch}, n_kv_heads={heads}, seq, head_dim={dim}) ({what})"
            )
        slots = returned[0].shape[2]
        held = written_slots(*returned, total)  # slot i holds token total - S' + i
        for name, got, want, other in zip(("keys", "values"), held, every, every[::-1], strict=True):
            want_aligned = want[:, :, total - got.shape[2] :]
            other_aligned = other[:, :, total - got.shape[2] :]
            swapped = torch.equal(got, other_aligned)
            instead = "values" if name == "keys" else "keys"
            assert torch.equal(got, want_aligned), (
                f"layer {layer} returned {name} that differ from the tokens it should hold: {slots} slots for "
                f"{total} tokens, max abs error {float((got.double() - want_aligned.double()).abs().max()):.3g}"
                + (f"; the cached {name} equal the recomputed {instead}: keys and values swapped" if swapped else "")
                + f" ({what})"
            )

    def crop(self, argument: int) -> bool:
        """crop(argument), in the protocol's meaning, on both; False when the cache refused (then it must be as
        it was, which the next steps check)."""
        convention = crop_convention(self.cache)
        asked = crop_argument(convention, argument, self.length)
        self.log.append(f"crop({asked}) of {self.length}")
        try:
            self.cache.crop(asked)  # type: ignore[attr-defined]
        except CROP_REFUSALS:
            return False
        kept = resolve_crop(argument, self.length)
        if kept < self.length:
            self.last_change = self.log[-1]
        self.tokens, self.mask = self.tokens[:, :kept], self.mask[:, :kept]
        self._expect_lengths(self.log[-1])
        return True

    def reorder(self, beam_idx: list[int]) -> None:
        self.log.append(f"reorder_cache({beam_idx})")
        index = torch.tensor(beam_idx, dtype=torch.long, device=self.tokens.device)
        self.cache.reorder_cache(index)  # type: ignore[attr-defined]
        if beam_idx != list(range(self.tokens.shape[0])):  # an identity reorder changes nothing
            self.last_change = self.log[-1]
        self.tokens, self.mask = self.tokens[index], self.mask[index]
        self._expect_lengths(self.log[-1])

    def reset(self) -> None:
        self.log.append("reset()")
        if self.length:
            self.last_change = self.log[-1]
        self.cache.reset()  # type: ignore[attr-defined]
        self.tokens, self.mask = self.tokens[:, :0], self.mask[:, :0]
        self._expect_lengths(self.log[-1])

    def fork(self, tokens: torch.Tensor) -> None:
        """Continue with a deep copy, after using both: the copy appends ``tokens``, then the original appends
        other tokens at the same positions, then each appends one more token and reads back what it holds.
        A copy that shares the original's storage then reads the original's tokens (or the other way round)."""
        self.log.append(f"fork (deepcopy) with {tokens.shape[1]} tokens on each side")
        original = self._twin(self.cache)
        self.cache = copy.deepcopy(self.cache)
        self.last_change = self.log[-1]
        self._expect_lengths(self.log[-1])
        count = min(tokens.shape[1], self.room - 1)
        if count < 1 or not self.length:
            return
        tokens = tokens[:, :count]
        other = (tokens + 1) % self.config.vocab_size  # the original's tokens differ from the copy's
        for session, fed in ((self, tokens), (original, other), (self, other[:, -1:]), (original, tokens[:, -1:])):
            session.append(fed)

    def _history(self) -> str:
        """The last operation that changed what the cache holds (an identity reorder, a crop that keeps every
        token or a reset of an empty cache changes nothing), then every operation so far."""
        return f"last operation that changed the cache: {self.last_change}; operations so far: " + (
            "; ".join(self.log) or "none")

    def _twin(self, cache: KVCache) -> Session:
        """A session over ``cache`` holding this session's sequence (the original of a fork)."""
        twin = copy.copy(self)
        twin.cache, twin.log = cache, [*self.log[:-1], "the original of the fork"]
        twin.side = f"original of the fork at operation {len(self.log)}: "  # its log is as long as the copy's
        return twin
