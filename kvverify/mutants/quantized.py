"""Mutants of a quantized cache, and what the quantizer replay buys over a plain tolerance.

The correct cache is transformers' fp8 ``QuantizedCache`` (``kvverify.adapters.hf:quantized_cache``). Each
mutant plants an error far smaller than fp8's own on it: the newest key or value of one layer scaled by
1 + ``ERROR`` in what ``update`` returns. Compared with exact recomputation within the fp8 tolerance
(``lossy_atol``), such an error is hidden by the quantizer's; compared with the reference run through the
same quantizer (:mod:`kvverify.suite.replay`), it is a bitwise difference.

``python -m kvverify.mutants.quantized [--seed N] [--max-examples N]`` runs ``cached_equals_uncached`` on each
mutant both ways and prints the examples it took to kill it (or "survived").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from kvverify.protocol import CacheDeclaration, CacheFactory, KVCache
from kvverify.reference.config import ModelConfig

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


@dataclass(frozen=True)
class QuantizedMutant:
    name: str
    layer: int
    what: str

    def factory(self, replay: bool) -> CacheFactory:
        """The mutant, declaring the fp8 tolerance, and with ``replay`` its quantizer too."""
        from kvverify.adapters.hf.caches import FP8_ATOL, FP8_QUANTIZER, quantized_cache

        def build(config: ModelConfig) -> KVCache:
            return NewestScaled(quantized_cache(config), min(self.layer, config.n_layers - 1), self.what, ERROR)

        build.kvverify_declaration = CacheDeclaration(  # type: ignore[attr-defined]
            lossy_atol=FP8_ATOL, quantizer=FP8_QUANTIZER if replay else None)
        return build


MUTANTS: tuple[QuantizedMutant, ...] = (
    QuantizedMutant("fp8_newest_value_1pct_layer0", 0, "value"),
    QuantizedMutant("fp8_newest_key_1pct_layer0", 0, "key"),
    QuantizedMutant("fp8_newest_value_1pct_last_layer", 99, "value"),
)


def main() -> None:
    from kvverify.suite import run_suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-examples", type=int, default=200)
    args = parser.parse_args()
    print(f"cached_equals_uncached, seed {args.seed}, up to {args.max_examples} examples; planted error {ERROR:.0%}")
    for mutant in MUTANTS:
        cells = []
        for replay in (False, True):
            result = run_suite(mutant.factory(replay), target=mutant.name, profile="ci", seed=args.seed,
                               properties=["cached_equals_uncached"], max_examples=args.max_examples)
            r = result.results[0]
            killed = r.verdict in ("failed", "error")
            cells.append(f"{'killed at example ' + str(r.examples) if killed else 'survived ' + str(r.examples)}")
        print(f"  {mutant.name:<36} tolerance only: {cells[0]:<24} replay: {cells[1]}")


if __name__ == "__main__":
    main()
