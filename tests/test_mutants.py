"""Every mutant is a real bug and every scenario is fair.

For each mutant, a hand-built scenario drives the reference model (strict numerics: cached and uncached
logits are bitwise identical) through the operations its bug needs. The mutant's logits must differ from
the uncached ones (or the run must fail), while the same scenario with its parent built-in cache matches
bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache

import pytest
import torch

from kvverify import BUILTIN_CACHES, ModelConfig, ReferenceModel
from kvverify.caches import PagedCache
from kvverify.checks.expected import teacher_forced
from kvverify.mutants import MUTANTS, NEEDS, Mutant
from kvverify.mutants.boundaries import CONTROLS
from kvverify.protocol.cache import KVCache

Factory = Callable[[ModelConfig], KVCache]
#: A scenario builds caches with the factory and returns (cached logits, uncached logits).
Scenario = Callable[[Factory], tuple[torch.Tensor, torch.Tensor]]

TINY = ModelConfig.preset("tiny", max_batch_size=4, max_seq_len=40)
WINDOW = TINY.replace(sliding_window=4)
ZERO_TOKEN = 5  # its embedding is zeroed in the zero-key model


@cache
def model(config: ModelConfig, zero_token: int | None = None) -> ReferenceModel:
    reference = ReferenceModel(config, seed=0)
    if zero_token is not None:
        reference.tok_embeddings.data[zero_token] = 0
    return reference


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, TINY.vocab_size, (batch, length), generator=generator)


def decode(config: ModelConfig, batch: int, prompt_len: int, new: int, zero_token: int | None = None) -> Scenario:
    """Prefill a prompt, then decode ``new`` tokens one at a time."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        reference = model(config, zero_token)
        prompt = tokens(batch, prompt_len)
        if zero_token is not None:
            prompt[:, 2] = zero_token
        cached = reference.generate(prompt, new, cache=factory(config)).logits
        return cached, reference.generate(prompt, new, use_cache=False).logits

    return scenario


def chunked(config: ModelConfig, first: int, prompt_len: int, new: int) -> Scenario:
    """Prefill ``first`` tokens, then the rest of the prompt as one chunk, then decode."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        reference, prompt = model(config), tokens(1, prompt_len)
        kv = factory(config)
        reference(prompt[:, :first], cache=kv)
        cached = reference.generate(prompt, new, cache=kv).logits
        return cached, reference.generate(prompt, new, use_cache=False).logits

    return scenario


def crop(config: ModelConfig, batch: int, prompt_len: int, new: int, argument: int, keep: int) -> Scenario:
    """Generate, ``crop(argument)`` (which keeps ``keep`` tokens), then generate a different continuation."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        reference = model(config)
        first = reference.generate(tokens(batch, prompt_len), new, cache=factory(config))
        kv = first.cache
        assert kv is not None and hasattr(kv, "crop")
        kv.crop(argument)
        prompt = torch.cat((first.sequences[:, :keep], tokens(batch, 3, seed=2)), dim=1)
        cached = reference.generate(prompt, 4, cache=kv).logits
        return cached, reference.generate(prompt, 4, use_cache=False).logits

    return scenario


def reorder(config: ModelConfig, batch: int, prompt_len: int, beam_idx: list[int]) -> Scenario:
    """Generate, ``reorder_cache(beam_idx)``, then continue each beam with a different token."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        reference = model(config)
        first = reference.generate(tokens(batch, prompt_len), 3, cache=factory(config))
        kv = first.cache
        assert kv is not None and hasattr(kv, "reorder_cache")
        index = torch.tensor(beam_idx)
        kv.reorder_cache(index)
        fork = tokens(len(beam_idx), 1, seed=3)
        prompt = torch.cat((first.sequences[index], fork), dim=1)
        cached = reference.generate(prompt, 3, cache=kv).logits
        return cached, reference.generate(prompt, 3, use_cache=False).logits

    return scenario


def reset(config: ModelConfig) -> Scenario:
    """Generate one sequence, ``reset()``, then generate a different, longer one through the same cache."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        reference = model(config)
        kv = reference.generate(tokens(1, 4), 3, cache=factory(config)).cache
        assert kv is not None and hasattr(kv, "reset")
        kv.reset()
        prompt = tokens(1, 9, seed=4)
        cached = reference.generate(prompt, 3, cache=kv).logits
        return cached, reference.generate(prompt, 3, use_cache=False).logits

    return scenario


def long_decode(length: int) -> Scenario:
    """Prefill 16 tokens and decode until the cache holds ``length``; the uncached logits of every step come
    from one teacher-forced forward (exact in strict numerics: tests/test_expected.py)."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        config = TINY.replace(max_seq_len=length, max_batch_size=1)
        reference, prompt = model(config), tokens(1, 16)
        cached = reference.generate(prompt, length - 15, cache=factory(config))
        return cached.logits, teacher_forced(reference, prompt, cached.tokens).logits

    return scenario


def fork(prompt_len: int = 4) -> Scenario:
    """Generate, deepcopy the cache, feed the copy and then the original different tokens, continue the copy."""

    def scenario(factory: Factory) -> tuple[torch.Tensor, torch.Tensor]:
        reference = model(TINY)
        first = reference.generate(tokens(1, prompt_len), 3, cache=factory(TINY))
        original = first.cache
        assert original is not None
        forked = copy.deepcopy(original)
        ours, theirs = tokens(1, 2, seed=5), tokens(1, 2, seed=6)
        held = first.sequences.shape[1] - 1
        reference(ours, cache=forked, start=held)
        reference(theirs, cache=original, start=held)
        prompt = torch.cat((first.sequences[:, :held], ours, tokens(1, 1, seed=7)), dim=1)
        cached = reference.generate(prompt, 3, cache=forked).logits
        return cached, reference.generate(prompt, 3, use_cache=False).logits

    return scenario


PAGED_2 = TINY.replace(max_batch_size=2)

#: The scenario of each mutant: the operations its bug needs, and nothing it does not.
SCENARIOS: dict[str, Scenario] = {
    "window_rolls_early": decode(WINDOW, 1, 2, 4),
    "window_keeps_w_minus_1": decode(WINDOW, 1, 2, 5),
    "window_slices_newest": chunked(WINDOW, 3, 9, 2),
    "window_start_underfull": decode(WINDOW, 1, 1, 3),
    "window_reset_keeps_pointer": reset(WINDOW),
    "positions_restart": decode(TINY, 1, 4, 3),
    "count_advanced_by_layer0": decode(TINY, 1, 4, 2),
    "offset_advanced_by_total": decode(TINY, 1, 4, 3),
    "static_valid_length_before_scatter": decode(TINY, 1, 4, 2),
    "static_last_slot_wraps": decode(TINY.replace(max_seq_len=12), 1, 8, 5),
    "static_length_from_nonzero": decode(TINY, 1, 5, 2, zero_token=ZERO_TOKEN),
    "static_first_token_unwritten": decode(TINY, 1, 4, 1),
    "static_reset_keeps_length": reset(TINY),
    "crop_negative_unclamped": crop(TINY, 1, 2, 2, -5, 0),
    "crop_zero_noop": crop(TINY, 1, 4, 2, 0, 0),
    "crop_first_layer_only": crop(TINY, 1, 4, 4, -2, 5),
    "reorder_keys_only": reorder(TINY, 2, 4, [1, 0]),
    "reorder_wrong_axis": reorder(TINY, 2, 4, [1, 0]),
    "paged_reorder_shares_blocks": reorder(PAGED_2, 2, 4, [0, 0]),
    "paged_crop_frees_partial_block": crop(TINY, 2, 4, 4, 6, 6),
    "paged_block_index_off_by_one": decode(TINY, 1, 3, 4),
    "gqa_repeated_before_cache": decode(TINY, 1, 4, 2),
    "gqa_tiled": decode(TINY, 1, 4, 2),
    "layer_reads_mod_2": decode(TINY.replace(n_layers=3), 1, 4, 2),
    "keys_as_values": decode(TINY, 1, 4, 1),
    "layout_read_as_old": decode(TINY, 1, 4, 1),
    "grow_copy_one_short": decode(TINY, 1, 12, 8),
    "wrong_batch_row": decode(TINY, 2, 4, 1),
    "dtype_bfloat16_storage": decode(TINY, 1, 4, 1),
    "dtype_promoted_float32": decode(TINY.replace(dtype=torch.float16), 1, 4, 2),
    "dtype_bits_reinterpreted": decode(TINY, 1, 4, 1),
    "compile_buffer_regrown": decode(TINY, 1, 4, 8),
    "compile_length_python_int": decode(TINY, 1, 4, 8),
    "position_in_12_bits": long_decode(2064),
    "static_stops_growing_at_2048": long_decode(2064),
    "fork_shares_buffers": fork(),
    "chunk_growth_drops_straddling_head": chunked(TINY.replace(max_seq_len=140), 120, 132, 3),
    "paged_crop_to_page_rewinds": crop(TINY, 1, 30, 5, 32, 32),
    "paged_fork_shares_partial_page": fork(),
}

#: Mutants whose logits are unchanged by design: the scenario checks the returned shape instead.
#: Scenarios that decode 2,048 tokens (30 s and more each): the slow tier's.
LONG = {"position_in_12_bits", "static_stops_growing_at_2048"}


def _tiered(names: set[str] | list[str]) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in LONG else n for n in sorted(names)]


SHAPE_ONLY = {name for name, mutant in MUTANTS.items() if "shape" in mutant.needs}
#: Mutants whose logits are right eagerly: the compiled property kills them (tests/test_compiled_property.py).
COMPILE_ONLY = {name for name, mutant in MUTANTS.items() if "compile" in mutant.needs}


#: Mutants whose parent is a boundary control (kvverify.mutants.boundaries.CONTROLS), not a built-in cache.
BOUNDARY_PARENTS: dict[str, Factory] = {
    "chunk_growth_drops_straddling_head": CONTROLS["chunked-growth"],
    "paged_crop_to_page_rewinds": CONTROLS["paged-pointer"],
    "paged_fork_shares_partial_page": CONTROLS["paged-fork"],
}


def parent_factory(mutant: Mutant) -> Factory:
    if mutant.name in BOUNDARY_PARENTS:
        return BOUNDARY_PARENTS[mutant.name]
    if mutant.name.startswith("paged_"):
        return PagedCache.from_config
    return BUILTIN_CACHES[mutant.parent]


def test_every_mutant_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(MUTANTS), (
        f"scenarios missing for {sorted(set(MUTANTS) - set(SCENARIOS))}, "
        f"scenarios for unknown mutants {sorted(set(SCENARIOS) - set(MUTANTS))}"
    )


def test_catalogue_is_wide_enough() -> None:
    from kvverify.mutants import SECTIONS

    assert len(MUTANTS) >= 25, f"the catalogue has {len(MUTANTS)} mutants; at least 25 expected"
    covered = {mutant.section for mutant in MUTANTS.values()}
    assert covered == set(SECTIONS), f"sections without a mutant: {sorted(set(SECTIONS) - covered)}"
    for mutant in MUTANTS.values():
        assert mutant.needs <= NEEDS.keys(), f"{mutant.name} needs unknown conditions"
        assert mutant.reference in (mutant.factory.__self__.__doc__ or ""), (  # type: ignore[attr-defined]
            f"{mutant.name}'s class docstring should name {mutant.reference}"
        )


def test_every_mutant_cites_a_bug_of_docs_kv_bugs() -> None:
    from pathlib import Path

    from kvverify.mutants import SECTIONS

    bugs = (Path(__file__).parents[1] / "docs" / "KV_BUGS.md").read_text(encoding="utf-8")
    headings = [line.removeprefix("## ") for line in bugs.splitlines() if line.startswith("## ")]
    assert set(SECTIONS) <= set(headings), f"sections missing from docs/KV_BUGS.md: {set(SECTIONS) - set(headings)}"
    missing = sorted({m.reference for m in MUTANTS.values() if m.reference not in bugs})
    assert not missing, f"mutants cite bugs that docs/KV_BUGS.md does not list: {missing}"


@pytest.mark.parametrize("name", _tiered(set(MUTANTS)))
def test_parent_passes_the_scenario(name: str) -> None:
    mutant = MUTANTS[name]
    cached, uncached = SCENARIOS[name](parent_factory(mutant))
    assert torch.equal(cached, uncached), (
        f"the correct {mutant.parent} cache fails the scenario built for {name}: the scenario is unfair"
    )


@pytest.mark.parametrize("name", _tiered(set(MUTANTS) - SHAPE_ONLY - COMPILE_ONLY))
def test_mutant_fails_the_scenario(name: str) -> None:
    mutant = MUTANTS[name]
    try:
        cached, uncached = SCENARIOS[name](mutant.factory)
    except Exception:  # a crash (an index out of range, a shape mismatch) also exposes the bug
        return
    assert not torch.equal(cached, uncached), f"{name} ({mutant.bug}) gives the uncached logits: not a bug here"


@pytest.mark.parametrize("name", sorted(SHAPE_ONLY))
def test_shape_only_mutant_breaks_the_contract(name: str) -> None:
    mutant = MUTANTS[name]
    kv = mutant.factory(TINY)
    keys = torch.zeros(1, TINY.n_kv_heads, 3, TINY.head_dim)
    returned, _ = kv.update(keys, keys.clone(), 0, {"cache_position": torch.arange(3)})
    assert returned.shape[1] != TINY.n_kv_heads, f"{name} returns {TINY.n_kv_heads} heads: no contract broken"
    cached, uncached = SCENARIOS[name](mutant.factory)
    assert torch.equal(cached, uncached), f"{name} changes the logits; it belongs with the logit mutants"


#: Subtle mutants pass where their bug's condition is missing: the boundary is where the catalogue says.
BELOW_THE_BOUNDARY: dict[str, Scenario] = {
    "wrong_batch_row": decode(TINY, 1, 4, 3),
    "layer_reads_mod_2": decode(TINY, 1, 4, 3),
    "gqa_tiled": decode(TINY.replace(n_kv_heads=1), 1, 4, 3),
    "layout_read_as_old": decode(TINY.replace(n_kv_heads=1), 1, 4, 3),
    "dtype_promoted_float32": decode(TINY, 1, 4, 3),
    "paged_crop_frees_partial_block": crop(TINY, 1, 4, 4, 6, 6),
    "grow_copy_one_short": decode(TINY, 1, 4, 12),
    "static_last_slot_wraps": decode(TINY.replace(max_seq_len=12), 1, 8, 4),
    "window_rolls_early": chunked(WINDOW, 2, 6, 3),
    "window_slices_newest": decode(WINDOW, 1, 2, 8),
    "crop_negative_unclamped": crop(TINY, 1, 4, 4, -2, 5),
    "position_in_12_bits": long_decode(2048),
    "static_stops_growing_at_2048": long_decode(2048),
    "chunk_growth_drops_straddling_head": chunked(TINY.replace(max_seq_len=140), 100, 120, 3),
    "paged_crop_to_page_rewinds": crop(TINY, 1, 30, 5, 33, 33),
    "paged_fork_shares_partial_page": fork(14),  # a fork at 16 tokens: no partly filled page
}


@pytest.mark.parametrize("name", _tiered(set(BELOW_THE_BOUNDARY)))
def test_subtle_mutant_hides_below_its_boundary(name: str) -> None:
    cached, uncached = BELOW_THE_BOUNDARY[name](MUTANTS[name].factory)
    assert torch.equal(cached, uncached), f"{name} fails without {sorted(MUTANTS[name].needs)}: the catalogue is wrong"


@pytest.mark.slow  # two spawned processes, each importing torch and kvverify afresh: 22 s
def test_isolated_mutants_run_each_in_a_fresh_process_and_report_the_same() -> None:
    # The path `mutants --device cuda` takes (one spawned process per mutant), run on the CPU.
    from kvverify.commands.mutants import _rows

    names = ["positions_restart", "offset_advanced_by_total"]  # the second trips a device-side assert on CUDA
    isolated = list(_rows(names, "dev", 0, False, torch.device("cpu"), isolate=True))
    in_process = list(_rows(names, "dev", 0, False, torch.device("cpu"), isolate=False))
    assert [r.name for r in isolated] == names, "rows must come back in the order asked"
    assert [(r.killed, r.killer) for r in isolated] == [(r.killed, r.killer) for r in in_process]
    assert all(r.killed for r in isolated)
