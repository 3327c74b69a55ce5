"""The Quantizer API: a cache's own round trip is called as documented (positions, layer, keys or values, new or
requantized) at the moments its scheme says, the built-in per-token and per-channel roundings do what their
docstring says, and a bad quantizer is refused with a message saying what came, what was expected and what to do."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from kvverify.checks.replay import ReplayCache
from kvverify.protocol.cache import CacheDeclaration
from kvverify.protocol.declaration import DeclarationError
from kvverify.protocol.quantizers import INT8_PER_TOKEN, Quantizer, QuantizerError, kivi
from kvverify.protocol.rounding import KeysAndValues, Rounding

QUANTIZED = 1000.0  # what the recording round trip adds: a returned slot holds a stored (round-tripped) token


@dataclass
class Recorder:
    """A round trip that records each call and marks what it returns (states + QUANTIZED)."""

    calls: list[tuple[list[int], int, bool, bool]] = field(default_factory=list)

    def __call__(self, states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
                 requantize: bool) -> torch.Tensor:
        assert positions.dtype == torch.long and positions.shape == (states.shape[-2],)
        self.calls.append((positions.tolist(), layer, is_key, requantize))
        return states + QUANTIZED


def states(start: int, count: int) -> torch.Tensor:
    """(1, 1, count, 2): token t holds the value t, so a returned slot says which token it is."""
    return torch.arange(start, start + count, dtype=torch.float64).reshape(1, 1, count, 1).expand(1, 1, count, 2)


def feed(cache: ReplayCache, start: int, count: int, layers: int = 1) -> list[torch.Tensor]:
    """Update every layer with tokens start..start+count-1; the keys each layer returned."""
    return [cache.update(states(start, count), states(start, count), layer)[0] for layer in range(layers)]


def tokens_and_marks(returned: torch.Tensor) -> list[tuple[int, bool]]:
    """Per slot: the token it holds and whether it went through the round trip."""
    column = returned[0, 0, :, 0].tolist()
    return [(int(v - QUANTIZED), True) if v >= QUANTIZED else (int(v), False) for v in column]


def test_kivi_scheme_calls_the_round_trip_as_kivi_does() -> None:
    recorder = Recorder()
    cache = ReplayCache(Quantizer(kind=recorder, scheme="kivi", residual_length=4))
    returned = feed(cache, 0, 6, layers=2)  # the prefill: 4 keys leave the residual, and the 2 oldest values
    assert recorder.calls == [([0, 1, 2, 3], 0, True, False), ([0, 1], 0, False, False),
                              ([0, 1, 2, 3], 1, True, False), ([0, 1], 1, False, False)]
    assert tokens_and_marks(returned[1]) == [(t, False) for t in range(6)], "the prefill is returned as given"
    recorder.calls.clear()
    keys = feed(cache, 6, 1)[0]  # keys: 3 in the residual; values: token 2 leaves it
    assert recorder.calls == [([2], 0, False, False)]
    assert tokens_and_marks(keys) == [(t, t < 4) for t in range(7)]
    recorder.calls.clear()
    keys = feed(cache, 7, 1)[0]  # 4 keys in the residual: quantized in one call
    assert recorder.calls == [([4, 5, 6, 7], 0, True, False), ([3], 0, False, False)]
    assert tokens_and_marks(keys) == [(t, True) for t in range(8)]
    recorder.calls.clear()
    feed(cache, 8, 5)  # a chunk of 5: 4 keys leave at once, one stays; 5 values leave, 4 stay
    assert recorder.calls == [([8, 9, 10, 11], 0, True, False), ([4, 5, 6, 7, 8], 0, False, False)]
    assert cache.get_seq_length() == 13


def test_requantize_scheme_flushes_everything_with_requantize_true() -> None:
    recorder = Recorder()
    cache = ReplayCache(Quantizer(kind=recorder, scheme="requantize", residual_length=3))
    assert tokens_and_marks(feed(cache, 0, 2)[0]) == [(0, False), (1, False)], "the prefill is returned as given"
    keys = feed(cache, 2, 1)[0]
    assert tokens_and_marks(keys) == [(0, True), (1, True), (2, False)]
    feed(cache, 3, 1)
    assert recorder.calls == [([0, 1], 0, True, False), ([0, 1], 0, False, False)]
    keys = feed(cache, 4, 1)[0]  # the residual reaches 3: everything returned is quantized again
    assert recorder.calls[2:] == [([0, 1, 2, 3, 4], 0, True, True), ([0, 1, 2, 3, 4], 0, False, True)]
    assert tokens_and_marks(keys)[2:] == [(2, False), (3, False), (4, False)], "returned before the flush"


def test_append_scheme_round_trips_new_tokens_once_and_can_return_the_stored_prefill() -> None:
    recorder = Recorder()
    cache = ReplayCache(Quantizer(kind=recorder, scheme="append", prefill="stored"))
    assert tokens_and_marks(feed(cache, 0, 3)[0]) == [(t, True) for t in range(3)]
    keys = feed(cache, 3, 2)[0]
    assert recorder.calls[2:] == [([3, 4], 0, True, False), ([3, 4], 0, False, False)]
    assert tokens_and_marks(keys) == [(t, True) for t in range(5)]


def test_a_plain_function_with_positional_parameters_is_a_round_trip() -> None:
    def own(states: torch.Tensor, positions: torch.Tensor, layer: int, is_key: bool, requantize: bool) -> torch.Tensor:
        return states.half().to(states.dtype)

    cache = ReplayCache(Quantizer(kind=own, scheme="append", prefill="stored"))
    x = torch.randn(1, 2, 3, 4)
    assert torch.equal(cache.update(x, x, 0)[0], x.half().float())


def test_per_token_symmetric_int8_keeps_each_tokens_absmax_and_rounds_to_127_levels() -> None:
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    out = INT8_PER_TOKEN.apply(x, positions=torch.arange(5), layer=0, is_key=True, requantize=False)
    absmax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(out.abs().amax(-1, keepdim=True), absmax, rtol=1e-6, atol=0)
    codes = out / (absmax / 127)
    assert torch.allclose(codes, codes.round(), atol=1e-4), "every value is a multiple of absmax / 127"


def test_per_channel_groups_share_one_scale_per_channel_and_group_of_tokens() -> None:
    x = torch.randn(1, 1, 8, 3, generator=torch.Generator().manual_seed(1))
    rounding = Rounding(bits=2, axis="channel", group_size=4)
    out = rounding(x, positions=torch.arange(8), layer=0, is_key=True, requantize=False)
    for group in (slice(0, 4), slice(4, 8)):  # each channel of each group: 4 levels from its min to its max
        chunk, back = x[0, 0, group], out[0, 0, group]
        assert torch.equal(chunk.amin(0), back.amin(0)) and torch.allclose(chunk.amax(0), back.amax(0))
        for channel in range(3):
            assert len(set(back[:, channel].tolist())) <= 4
    with pytest.raises(ValueError, match="whole number of groups"):
        rounding(x[:, :, :6], positions=torch.arange(6), layer=0, is_key=True, requantize=False)


def test_kivi_is_keys_per_channel_and_values_per_token() -> None:
    quantizer = kivi(2, group_size=4, residual_length=8)
    assert quantizer.kind == KeysAndValues(Rounding(2, "channel", 4), Rounding(2, "token"))
    assert quantizer.scheme == "kivi" and quantizer.residual_length == 8 and quantizer.prefill == "given"
    with pytest.raises(QuantizerError, match="multiple of group_size"):
        kivi(2, group_size=4, residual_length=6)


def test_a_bad_round_trip_is_refused_saying_what_came_and_what_to_do() -> None:
    with pytest.raises(QuantizerError, match=r"Quantizer.kind is 42 \(a int\); expected .* a callable"):
        Quantizer(kind=42, scheme="append")  # type: ignore[arg-type]
    with pytest.raises(QuantizerError, match=r"cannot be called as round_trip.*give it the parameters"):
        Quantizer(kind=lambda states: states, scheme="append")  # type: ignore[arg-type]
    with pytest.raises(QuantizerError, match="group_size is 4 with a round trip of its own"):
        Quantizer(kind=Rounding(bits=4), group_size=4)
    with pytest.raises(QuantizerError, match="'kivi' with kind 'int2'"):
        Quantizer(kind="int2", group_size=2, scheme="kivi")
    with pytest.raises(QuantizerError, match="residual_length is 0; expected an int >= 1"):
        Quantizer(kind=Rounding(bits=2), scheme="kivi")
    with pytest.raises(QuantizerError, match="prefill is 'never'"):
        Quantizer(kind=Rounding(bits=2), prefill="never")  # type: ignore[arg-type]
    with pytest.raises(DeclarationError, match=r"CacheDeclaration\.quantizer is 'int8'"):
        CacheDeclaration(quantizer="int8")  # type: ignore[arg-type]


@pytest.mark.parametrize("wrong, expected", [
    (lambda s, *, positions, layer, is_key, requantize: s.float(), r"dtype torch.float32.*expected.*torch.float16"),
    (lambda s, *, positions, layer, is_key, requantize: s[:, :, :1], r"shape \(1, 1, 1, 2\).*expected.*\(1, 1, 3, 2\)"),
    (lambda s, *, positions, layer, is_key, requantize: (s, s), r"returned tuple.*expected a tensor"),
])
def test_a_round_trip_returning_the_wrong_thing_is_named(wrong: object, expected: str) -> None:
    cache = ReplayCache(Quantizer(kind=wrong, scheme="append"))  # type: ignore[arg-type]
    x = torch.ones(1, 1, 3, 2, dtype=torch.float16)
    with pytest.raises(QuantizerError, match=expected):
        cache.update(x, x, 0)


def test_a_bad_round_trip_fails_the_suite_with_its_message() -> None:
    from kvverify.caches import Int8PerTokenCache
    from kvverify.runs import run_suite

    def doubled(states: torch.Tensor, *, positions: torch.Tensor, layer: int, is_key: bool,
                requantize: bool) -> torch.Tensor:
        return torch.cat((states, states), dim=-1)  # (B, Hkv, T, 2D): wrong at every shape

    def factory(config: object) -> Int8PerTokenCache:
        cache = Int8PerTokenCache()
        cache.kvverify_declaration = CacheDeclaration(  # type: ignore[misc]
            lossy_atol=1.0, quantizer=Quantizer(kind=doubled, scheme="append"))
        return cache

    result = run_suite(factory, target="bad", profile="dev", seed=0, properties=["cached_equals_uncached"],
                       max_examples=30)
    assert not result.ok
    detail = result.failures[0].detail
    assert "doubled" in detail and "expected what it was given" in detail, detail
