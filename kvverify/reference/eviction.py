"""The eviction oracle's reference side: a cache that attends to exactly the tokens a compressing cache kept, and
the kept sets its declared rule allows (:mod:`kvverify.protocol.eviction`).

:class:`SubsetReplayCache` stores every key and value the model recomputes, by slot, and on each ``update``
returns the slots it is told the cache under test held before that update (``held``: (B, Hkv, S) slot indices,
in the cache's own order), then the new tokens. The keys were rotated at their original positions by the model,
so attending to them is "attention over exactly those positions, with their original positions"; in strict
numerics the sums run over the keys in the returned order, so a cache whose kept tokens are the recomputed ones
gives the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify.protocol.eviction import Eviction


def gather_slots(states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """states (B, Hkv, N, D), slots (B, Hkv, S) long in 0..N-1 -> (B, Hkv, S, D)."""
    return states.gather(2, slots[..., None].expand(-1, -1, -1, states.shape[-1]))


class SubsetReplayCache:
    """A trivially correct compressing cache, told what to keep: ``held[layer]`` is a list, one entry per
    ``update`` of that layer, of the slots (B, Hkv, S) held before it (S = 0 before the first)."""

    def __init__(self, held: list[list[torch.Tensor]]) -> None:
        self.held = held
        self.keys: list[torch.Tensor] = []  # per layer: (B, Hkv, N, D), every token recomputed, by slot
        self.values: list[torch.Tensor] = []
        self.calls: list[int] = []  # per layer: updates so far

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key_states[:, :, :0])
            self.values.append(value_states[:, :, :0])
            self.calls.append(0)
        call = self.calls[layer_idx]
        if call >= len(self.held[layer_idx]):
            raise IndexError(f"layer {layer_idx}: update {call + 1}, but the cache under test made "
                             f"{len(self.held[layer_idx])}")
        slots = self.held[layer_idx][call]  # (B, Hkv, S)
        self.calls[layer_idx] += 1
        self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key_states), dim=-2)
        self.values[layer_idx] = torch.cat((self.values[layer_idx], value_states), dim=-2)
        kept_k, kept_v = gather_slots(self.keys[layer_idx], slots), gather_slots(self.values[layer_idx], slots)
        return torch.cat((kept_k, key_states), dim=-2), torch.cat((kept_v, value_states), dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


def sinks_and_window(eviction: Eviction, prefill: int) -> torch.Tensor:
    """The slots StreamingLLM keeps of a prefill: the first ``n_sink`` and the newest, ``n_kept`` in all.
    Returns (n_kept,) long, ascending."""
    n_kept = eviction.n_kept(prefill)
    sinks = min(eviction.n_sink, n_kept)
    return torch.cat((torch.arange(sinks), torch.arange(prefill - (n_kept - sinks), prefill)))


def key_norm_violations(keys: torch.Tensor, kept: torch.Tensor, rtol: float = 1e-5) -> list[str]:
    """Where a kept set breaks "the smallest key norms per head": a kept key whose norm exceeds an evicted one's
    beyond ``rtol`` (the norm's own rounding; ties may go either way). keys (B, Hkv, N, D) recomputed, kept
    (B, Hkv, S) slots. Returns one line per (row, head) that breaks it."""
    norms = torch.linalg.vector_norm(keys.double(), dim=-1)  # (B, Hkv, N)
    found = []
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            is_kept = torch.zeros(keys.shape[2], dtype=torch.bool, device=keys.device)
            is_kept[kept[b, h]] = True
            if bool(is_kept.all()) or not bool(is_kept.any()):
                continue
            largest_kept, smallest_evicted = norms[b, h][is_kept].max(), norms[b, h][~is_kept].min()
            if largest_kept > smallest_evicted * (1 + rtol):
                worst = int(torch.nonzero(is_kept & (norms[b, h] == largest_kept))[0])
                best = int(torch.nonzero(~is_kept & (norms[b, h] == smallest_evicted))[0])
                found.append(f"row {b}, KV head {h}: kept slot {worst} (key norm {float(largest_kept):.6g}) but "
                             f"evicted slot {best} (key norm {float(smallest_evicted):.6g})")
    return found
