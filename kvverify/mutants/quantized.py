"""Mutants of quantized caches, and what the quantizer replay buys over a plain tolerance.

Each mutant plants an error far smaller than its quantizer's own, on layer 0:

- transformers' fp8 ``QuantizedCache`` (``kvverify.adapters.hf:quantized_cache``): the newest key or value
  scaled by 1 + ``ERROR`` in what ``update`` returns;
- the symmetric int8 cache (:class:`kvverify.caches.Int8PerTokenCache`): the stored scale of the newest token of
  every update 1% off, for keys or for values;
- the KIVI-2 and KIVI-4 caches (:class:`kvverify.caches.KiviCache`): the scale (step) of channel 0 of the newest
  key group 1% off whenever keys are quantized, or the scale of the newest value leaving the residual.

Compared with exact recomputation within the cache's tolerance (``lossy_atol``), such an error is hidden by the
quantizer's; compared with the reference run through the same quantizer (:mod:`kvverify.checks.replay`), it is a
bitwise difference.

``python -m kvverify.mutants.quantized [--seed N] [--max-examples N] [--only NAME ...]`` runs
``cached_equals_uncached`` on each mutant both ways and prints, as a Markdown table, the example that killed it
(1: the first) or the examples it survived.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.caches.int8 import INT8_ATOL, Int8PerTokenCache
from kvverify.caches.kivi import GROUP_SIZE, KIVI2_ATOL, KIVI4_ATOL, RESIDUAL_LENGTH, KiviCache, KiviCodes
from kvverify.protocol.cache import CacheDeclaration, CacheFactory, KVCache
from kvverify.protocol.config import ModelConfig
from kvverify.protocol.quantizers import INT8_PER_TOKEN, Quantizer, kivi
from kvverify.runs.tables import markdown_row, markdown_table

#: The planted relative error.
ERROR = 0.01


class NewestScaled:
    """A cache whose ``update`` returns, for one layer, its newest key or value scaled by ``1 + error``."""

    def __init__(self, inner: Any, layer: int, what: str, error: float) -> None:
        self.inner, self.layer, self.what, self.error = inner, layer, what, error

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.update(key_states, value_states, layer_idx, cache_kwargs)
        if layer_idx == self.layer:
            if self.what == "key":
                keys = keys.clone()
                keys[:, :, -1] *= 1 + self.error  # (B, Hkv, S, D): the newest token
            else:
                values = values.clone()
                values[:, :, -1] *= 1 + self.error
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.get_seq_length(layer_idx))


class Int8NewestScaleOff(Int8PerTokenCache):
    """The int8 cache storing the newest token's scale (of keys or values, layer 0) 1% off at every update."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def _quantize(self, states: torch.Tensor, layer_idx: int, is_key: bool) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scale = super()._quantize(states, layer_idx, is_key)
        if layer_idx == 0 and is_key == (self.what == "key"):
            scale[:, :, -1] *= 1 + ERROR  # (B, Hkv, T, 1): the newest token's scale
        return codes, scale


class KiviScaleOff(KiviCache):
    """A KIVI cache (layer 0) whose newest key group has channel 0's scale 1% off ("key"), or whose newest value
    leaving the residual has its scale 1% off ("value")."""

    def __init__(self, bits: int, what: str) -> None:
        super().__init__(bits, GROUP_SIZE, RESIDUAL_LENGTH)
        self.what = what

    def _keys_per_channel(self, keys: torch.Tensor, layer_idx: int) -> KiviCodes:
        quantized = super()._keys_per_channel(keys, layer_idx)
        if layer_idx == 0 and self.what == "key" and quantized.step.shape[2]:
            quantized.step[:, :, -1, :, 0] *= 1 + ERROR  # (B, Hkv, groups, 1, D): channel 0 of the newest group
        return quantized

    def _values_per_token(self, values: torch.Tensor, layer_idx: int) -> KiviCodes:
        quantized = super()._values_per_token(values, layer_idx)
        if layer_idx == 0 and self.what == "value" and quantized.step.shape[2]:
            quantized.step[:, :, -1] *= 1 + ERROR  # (B, Hkv, T, 1): the newest value quantized
        return quantized


def _fp8(what: str, layer: int) -> Callable[[ModelConfig], KVCache]:
    def build(config: ModelConfig) -> KVCache:
        from kvverify.adapters.hf.caches import quantized_cache

        return NewestScaled(quantized_cache(config), min(layer, config.n_layers - 1), what, ERROR)

    return build


def _fp8_declared() -> tuple[float, Quantizer]:
    from kvverify.adapters.hf.caches import FP8_ATOL, FP8_QUANTIZER

    return FP8_ATOL, FP8_QUANTIZER


def _kivi_declared(bits: int) -> Callable[[], tuple[float, Quantizer]]:
    atol = KIVI2_ATOL if bits <= 2 else KIVI4_ATOL
    return lambda: (atol, kivi(bits, group_size=GROUP_SIZE, residual_length=RESIDUAL_LENGTH))


@dataclass(frozen=True)
class QuantizedMutant:
    """name; bug: one line; build: the buggy cache for a model config; declared: its (lossy_atol, quantizer),
    looked up when needed (the fp8 ones live beside transformers)."""

    name: str
    bug: str
    build: Callable[[ModelConfig], Any]
    declared: Callable[[], tuple[float, Quantizer]]

    def factory(self, replay: bool) -> CacheFactory:
        """The mutant, declaring its tolerance, and with ``replay`` its quantizer too."""
        atol, quantizer = self.declared()
        declaration = CacheDeclaration(lossy_atol=atol, quantizer=quantizer if replay else None)

        def build(config: ModelConfig) -> KVCache:
            cache = self.build(config)
            if hasattr(type(cache), "kvverify_declaration") or hasattr(cache, "kvverify_declaration"):
                cache.kvverify_declaration = declaration  # the correct cache's own declares its quantizer
            result: KVCache = cache
            return result

        build.kvverify_declaration = declaration  # type: ignore[attr-defined]
        return build


MUTANTS: tuple[QuantizedMutant, ...] = (
    QuantizedMutant("fp8_newest_value_1pct_layer0", "fp8: the newest value × 1.01, layer 0",
                    _fp8("value", 0), _fp8_declared),
    QuantizedMutant("fp8_newest_key_1pct_layer0", "fp8: the newest key × 1.01, layer 0", _fp8("key", 0), _fp8_declared),
    QuantizedMutant("fp8_newest_value_1pct_last_layer", "fp8: the newest value × 1.01, last layer",
                    _fp8("value", 99), _fp8_declared),
    QuantizedMutant("int8_newest_value_scale_1pct", "int8 per token: the newest value's scale × 1.01, layer 0",
                    lambda config: Int8NewestScaleOff("value"), lambda: (INT8_ATOL, INT8_PER_TOKEN)),
    QuantizedMutant("int8_newest_key_scale_1pct", "int8 per token: the newest key's scale × 1.01, layer 0",
                    lambda config: Int8NewestScaleOff("key"), lambda: (INT8_ATOL, INT8_PER_TOKEN)),
    QuantizedMutant("kivi2_key_group_scale_1pct", "KIVI-2: channel 0's scale × 1.01 in the newest key group, layer 0",
                    lambda config: KiviScaleOff(2, "key"), _kivi_declared(2)),
    QuantizedMutant("kivi2_value_scale_1pct", "KIVI-2: the newest quantized value's scale × 1.01, layer 0",
                    lambda config: KiviScaleOff(2, "value"), _kivi_declared(2)),
    QuantizedMutant("kivi4_key_group_scale_1pct", "KIVI-4: channel 0's scale × 1.01 in the newest key group, layer 0",
                    lambda config: KiviScaleOff(4, "key"), _kivi_declared(4)),
    QuantizedMutant("kivi4_value_scale_1pct", "KIVI-4: the newest quantized value's scale × 1.01, layer 0",
                    lambda config: KiviScaleOff(4, "value"), _kivi_declared(4)),
)


def main() -> None:
    from kvverify.runs import run_suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[m.name for m in MUTANTS],
                        help="these mutants only (default: all)")
    args = parser.parse_args()
    print(f"cached_equals_uncached, profile ci, seed {args.seed}, up to {args.max_examples} examples; "
          f"planted error {ERROR:.0%}\n")
    print("\n".join(markdown_table(("mutant", "bug", "within `lossy_atol`", "replayed quantizer"), [])))
    for mutant in MUTANTS:
        if args.only and mutant.name not in args.only:
            continue
        cells = []
        for replay in (False, True):
            result = run_suite(mutant.factory(replay), target=mutant.name, profile="ci", seed=args.seed,
                               properties=["cached_equals_uncached"], max_examples=args.max_examples)
            r = result.results[0]
            killed = r.verdict in ("failed", "error")
            # examples: those run before the first failure, so the killing one is the next
            cells.append(f"killed at example {r.examples + 1}" if killed else f"survived {r.examples} examples")
        atol = mutant.declared()[0]
        print(markdown_row((mutant.name, mutant.bug, f"({atol}) {cells[0]}", cells[1])), flush=True)


if __name__ == "__main__":
    main()
