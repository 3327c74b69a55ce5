"""Where a failing case goes wrong: the first step, layer, head and position at which the keys or values
the cache returned differ from the ones recomputed from the same inputs.

The minimal case is run again with every cache the property builds shadowed by a
:class:`~kvverify.caches.ContiguousCache` that receives the same updates, crops, reorders and resets. Up to
the first wrong slot the model's inputs are exactly the uncached path's, so the shadow holds the keys and
values the uncached path recomputes. Returned slots are aligned to tokens by the protocol's rule
(:func:`kvverify.protocol.written_slots`) and, with a sliding window, only slots some query can see are
compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvverify.caches import ContiguousCache
from kvverify.checks.contract import UpdateObserver
from kvverify.checks.target import Target
from kvverify.checks.watchdog import ExampleTimeout, run_with_time_limit
from kvverify.protocol.cache import written_slots


@dataclass(frozen=True)
class Difference:
    """One place where a returned key or value differs from the recomputed one."""

    cache: int  # which cache of the property (0: the first it built)
    step: int  # forward index on that cache (0: the first update of layer 0)
    layer: int
    head: int  # KV head
    row: int  # batch row
    position: int  # token slot (0: the first token the cache saw, left padding included)
    what: str  # "key" or "value"
    max_abs: float  # largest |returned - recomputed| at this position, over rows and heads
    new_tokens: int  # tokens in that update
    written: int  # tokens written to the layer after it
    note: str = ""  # what the wrong tensor equals instead, when it is recognisable

    def __str__(self) -> str:
        return (
            f"layer {self.layer}, head {self.head}, position {self.position}: cached {self.what} differs from "
            f"recomputed {self.what}, max abs {self.max_abs:.3g} (step {self.step}, a {self.new_tokens}-token "
            f"update bringing the layer to {self.written} tokens; batch row {self.row}"
            + (f"; cache #{self.cache} the property built" if self.cache else "") + ")"
            + (f"; {self.note}" if self.note else "")
        )


@dataclass
class DifferenceLog:
    """Collects the differences of every cache the property builds; ``observer()`` makes one per cache."""

    window: int | None = None
    lossy: bool = False
    found: list[tuple[int, Difference]] = field(default_factory=list)
    _caches: int = 0
    _calls: int = 0

    def observer(self) -> UpdateObserver:
        self._caches += 1
        return _Shadow(self, self._caches - 1)

    def tick(self) -> int:
        self._calls += 1
        return self._calls

    def first(self) -> Difference | None:
        """The earliest difference (the largest, for a lossy cache, whose small ones are expected)."""
        if not self.found:
            return None
        if self.lossy:
            return max(self.found, key=lambda item: item[1].max_abs)[1]
        return min(self.found, key=lambda item: item[0])[1]


class _Shadow:
    def __init__(self, log: DifferenceLog, index: int) -> None:
        self.log, self.index = log, index
        self.shadow = ContiguousCache()
        self.step = -1

    def updated(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, written: int) -> None:
        if layer_idx == 0:
            self.step += 1
        order = self.log.tick()
        expected_keys, expected_values = self.shadow.update(key_states, value_states, layer_idx)
        count = key_states.shape[-2]
        keys, values = written_slots(keys, values, written)  # slot i holds token first + i
        first = written - keys.shape[-2]
        slots = _visible_slots(first, written, count, self.log.window, keys.device)
        returned = slots - first
        pairs = (("key", keys, expected_keys, expected_values), ("value", values, expected_values, expected_keys))
        for what, actual, expected, other in pairs:
            difference = self._compare(actual[:, :, returned], expected[:, :, slots], slots, layer_idx, what,
                                       count, written)
            if difference is not None:
                self.log.found.append((order, replace(difference, note=_swapped(what, actual[:, :, returned],
                                                                                other[:, :, slots]))))
                return

    def _compare(self, actual: torch.Tensor, expected: torch.Tensor, slots: torch.Tensor, layer: int, what: str,
                 count: int, written: int) -> Difference | None:
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(diff), diff.nan_to_num(nan=float("inf")))
        per_slot = diff.amax(dim=(0, 1, 3))  # (slots,)
        if not bool((per_slot > 0).any()):
            return None
        column = int(per_slot.argmax()) if self.log.lossy else int((per_slot > 0).nonzero()[0])
        at = diff[:, :, column].amax(dim=-1)  # (B, Hkv)
        row, head = divmod(int(at.flatten().argmax()), at.shape[1])
        return Difference(self.index, self.step, layer, head, row, int(slots[column]), what,
                          float(per_slot[column]), count, written)

    def cropped(self, kept: int) -> None:
        self.shadow.crop(kept)

    def reordered(self, beam_idx: torch.Tensor) -> None:
        self.shadow.reorder_cache(beam_idx)  # type: ignore[arg-type]

    def was_reset(self) -> None:
        self.shadow.reset()


def _swapped(what: str, actual: torch.Tensor, other: torch.Tensor) -> str:
    """A note when the returned keys equal the recomputed values (or the other way round): K and V swapped."""
    if actual.shape != other.shape or not torch.equal(actual, other.to(actual.dtype)):
        return ""
    instead = "value" if what == "key" else "key"
    return f"the cached {what} equals the recomputed {instead}: keys and values swapped (or one returned as both)"


def _visible_slots(first: int, written: int, count: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Token slots, of the ``first..written-1`` the returned tensor holds, that some query of the update can see,
    on ``device``."""
    if window is not None:
        first = max(first, written - count - window + 1)
    return torch.arange(first, written, device=device)


def locate(check: Callable[[Target, Any], None], target: Target, case: Any, time_limit: float | None) -> str:
    """Run ``check(target, case)`` again with shadows and say where the cache first went wrong."""
    if target.declaration.keeps is not None:  # slots hold kept tokens, not the newest: the oracle locates itself
        return "where: for a cache that keeps a subset, the eviction oracle's message above (kvverify.checks.eviction)."
    config = getattr(case, "config", None)
    log = DifferenceLog(window=getattr(config, "sliding_window", None),
                        lossy=target.declaration.lossy_atol is not None)
    located = replace(target, observe=log.observer)
    failed = True
    try:
        run_with_time_limit(lambda: check(located, case), time_limit, "the minimal case, run again to locate it")
        failed = False
    except ExampleTimeout:
        return "where: the minimal case timed out when run again to locate the failure."
    except Exception:
        pass
    difference = log.first()
    if difference is not None:
        lead = "largest difference" if log.lossy else "first difference"
        return f"where ({lead}): {difference}"
    if not failed:
        return ("where: the minimal case passes when run again on its own: the failure depends on earlier examples "
                "(state shared between the caches the factory returns, or a global the cache keeps).")
    return ("where: the keys and values the cache returned equal the ones recomputed from the same inputs at every "
            "step, layer and visible position; the failure lies elsewhere (the message above says what).")
