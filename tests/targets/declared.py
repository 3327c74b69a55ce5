"""Small caches that are correct only inside a range they may declare, for tests/test_declarations.py.

Each breaks (returns wrong values, or rotates wrongly) outside its range: declared, the suite stays inside
and the cache passes; undeclared, the suite leaves the range and the cache fails. Also: caches with a bug
only past 50 tokens or at a 64-token page boundary, and caches that raise ``kvverify.Unsupported``.
"""

from __future__ import annotations

from typing import Any

import torch

from kvverify import CacheDeclaration, ModelConfig, Unsupported
from kvverify.caches import ContiguousCache
from kvverify.checks.positional import apply_rope
from kvverify.reference.numerics import rope_tables


class Concat(ContiguousCache):
    """The built-in concatenating cache; ``wrong(...)`` says when a subclass corrupts the values it stores."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.wrong(key_states, self.get_seq_length(layer_idx)):
            value_states = value_states + 1  # the bug
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        """key_states: (B, Hkv, T, D), written from slot ``start``."""
        return False


class HeadDim8(Concat):
    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        return key_states.shape[-1] != 8


class Float64Only(Concat):
    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        return key_states.dtype != torch.float64


class AtMostTwoRows(Concat):
    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        return key_states.shape[0] > 2


class TwentyTokens(Concat):
    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        return start + key_states.shape[-2] > 20


class PastFifty(Concat):
    """Corrupts token 50 (a bug only long sequences reach)."""

    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        return start <= 50 < start + key_states.shape[-2]


class PageOf64(Concat):
    """Pages of 64 tokens; a multi-token append that crosses a page boundary writes the next page wrong."""

    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        count = key_states.shape[-2]
        return count > 1 and start // 64 != (start + count - 1) // 64


class Pages24(Concat):
    """Pages of 24 tokens; a multi-token append ending exactly at the end of page 2 or later goes wrong."""

    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        end = start + key_states.shape[-2]
        return key_states.shape[-2] > 1 and end >= 48 and end % 24 == 0


class ExactBatch(Concat):
    """Built for exactly the batch its factory was given; wrong for any other."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def wrong(self, key_states: torch.Tensor, start: int) -> bool:
        return key_states.shape[0] != self.batch_size or self.batch_size != 2


class Window3(Concat):
    """A sliding window of 3: returns only the newest W - 1 + T tokens."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        keep = 3 - 1 + key_states.shape[-2]
        return keys[:, :, -keep:], values[:, :, -keep:]


class RemovesOnCrop(Concat):
    """``crop(n)`` removes n tokens from the end (transformers 5's meaning, lenient about the sign)."""

    def crop(self, max_length: int) -> None:
        super().crop(max(0, self.get_seq_length() - abs(max_length)))


class RotatesKeys(Concat):
    """Applies RoPE itself with the cos and sin the suite hands it."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = cache_kwargs or {}
        cos, sin = kwargs.get("cos"), kwargs.get("sin")
        if cos is None or sin is None:  # undeclared: rotates by the cache position, on top of the model's rotation
            positions = kwargs["cache_position"][None].expand(key_states.shape[0], -1)
            cos, sin = (t[:, 0] for t in rope_tables(positions, key_states.shape[-1], 10000.0, key_states.dtype))
        return super().update(apply_rope(key_states, cos, sin), value_states, layer_idx, cache_kwargs)


class Rounds(Concat):
    """Stores values rounded to a grid of 1/64: lossy."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states, (value_states * 64).round() / 64, layer_idx, cache_kwargs)


class RefusesHeadDims(Concat):
    """Raises Unsupported for a head_dim other than 4 (and so declines some examples)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-1] != 4:
            raise Unsupported(f"head_dim {key_states.shape[-1]}: only 4")
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


def _factory(cls: type[Concat], declaration: CacheDeclaration | None = None) -> Any:
    def make(config: ModelConfig) -> Concat:
        return cls(config)
    make.__qualname__ = f"{cls.__name__}{'' if declaration is None else '+declared'}"
    if declaration is not None:
        make.kvverify_declaration = declaration  # type: ignore[attr-defined]
    return make


def exact_batch(config: ModelConfig, batch_size: int) -> ExactBatch:
    return ExactBatch(batch_size)


def exact_batch_declared(config: ModelConfig, batch_size: int) -> ExactBatch:
    return ExactBatch(batch_size)


exact_batch_declared.kvverify_declaration = CacheDeclaration(batch_sizes=(2,))  # type: ignore[attr-defined]


class RemovesDeclared(RemovesOnCrop):
    kvverify_declaration = CacheDeclaration(crop_argument="remove")


#: field -> (the cache undeclared, the same cache declared)
PAIRS: dict[str, tuple[Any, Any]] = {
    "head_dims": (_factory(HeadDim8), _factory(HeadDim8, CacheDeclaration(head_dims=(8,)))),
    "dtypes": (_factory(Float64Only), _factory(Float64Only, CacheDeclaration(dtypes=(torch.float64,)))),
    "max_batch_size": (_factory(AtMostTwoRows), _factory(AtMostTwoRows, CacheDeclaration(max_batch_size=2))),
    "max_seq_len": (_factory(TwentyTokens), _factory(TwentyTokens, CacheDeclaration(max_seq_len=20))),
    "batch_sizes": (exact_batch, exact_batch_declared),
    "sliding_window": (_factory(Window3), _factory(Window3, CacheDeclaration(sliding_window=3))),
    "positional": (_factory(RotatesKeys), _factory(RotatesKeys, CacheDeclaration(positional="rope"))),
    "lossy_atol": (_factory(Rounds), _factory(Rounds, CacheDeclaration(lossy_atol=1.0))),
    "crop_argument": (_factory(RemovesOnCrop), _factory(RemovesDeclared)),
}

past_fifty = _factory(PastFifty)
page_of_64 = _factory(PageOf64)
pages_24 = _factory(Pages24)
pages_24_declared = _factory(Pages24, CacheDeclaration(block_size=24))
refuses_head_dims = _factory(RefusesHeadDims)
refuses_everything = _factory(RefusesHeadDims, CacheDeclaration(head_dims=(8,)))
lossy = PAIRS["lossy_atol"][1]
