"""Bugs planted into transformers' continuous batching at run time, to show that ``verify-engine`` finds them.

Each mutant is a context manager that swaps one method of the engine's allocator, scheduler, cache or request
classes (or one module function) for a version with a bug of a kind serving engines have had, and puts the
original back on exit: the installed package is never edited. ``kvverify verify-engine transformers --mutant
NAME`` runs the properties with one planted; ``scripts/engine-mutants`` runs each on seeds 0 to 4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvverify.adapters import import_transformers

#: The engine these bugs are planted into (``verify-engine ENGINE --mutant NAME``).
ENGINE = "transformers"


@dataclass(frozen=True)
class EngineMutant:
    """``module`` (under ``transformers.generation.continuous_batching``), the ``owner`` in it (a class, or ""
    for the module itself) and its ``attribute``, replaced by ``make(original)``; ``bug`` says what goes wrong."""

    name: str
    bug: str
    module: str
    owner: str
    attribute: str
    make: Callable[[Any], Any]

    @contextmanager
    def planted(self) -> Iterator[None]:
        module = import_transformers(f"generation.continuous_batching.{self.module}")
        owner = getattr(module, self.owner) if self.owner else module
        original = owner.__dict__[self.attribute] if isinstance(owner, type) else getattr(owner, self.attribute)
        setattr(owner, self.attribute, self.make(original))
        try:
            yield
        finally:
            setattr(owner, self.attribute, original)


def _free_ignoring_sharing(original: Any) -> Any:
    def free_blocks(self: Any, request_id: str, no_cache: bool = False) -> None:
        blocks = self.block_table.pop(request_id, [])
        for block in blocks:  # every block straight back to the pool: shared and hashed ones too
            self.ledger.shared_ref_counts.pop(block, None)
            self.ledger.cached_blocks.pop(block, None)
        self.pool.free_blocks(self.index, blocks)
    return free_blocks


def _hash_without_last_token(original: Any) -> Any:
    def compute_block_hash(parent_hash: int | None, tokens: list[int]) -> int:
        return int(original(parent_hash, tokens[:-1]))
    return compute_block_hash


def _ring_one_short(original: Any) -> Any:
    def _token_indices_to_physical_indices(self: Any, request_id: str, start_index: int, length: int) -> list[int]:
        table = self.block_table[request_id]
        ring = max(1, self.sliding_window - 1)  # the window wraps one slot early
        slots = [divmod(t % ring, self.tokens_per_page) for t in range(start_index, start_index + length)]
        return [table[page] * self.block_physical_stride + offset for page, offset in slots]
    return _token_indices_to_physical_indices


def _chunk_at_page_start(original: Any) -> Any:
    def get_write_indices(self: Any, request_id: str, past_length: int, query_length: int) -> list[int]:
        if query_length > 1:  # a prefill chunk that starts mid-page is written from the page's start
            past_length -= past_length % self.tokens_per_page
        return list(original(self, request_id, past_length, query_length))
    return get_write_indices


def _chunk_repeats_token(original: Any) -> Any:
    def _schedule_request(self: Any, state: Any, request_tokens: list[int], token_budget: int,
                          removed: set[str]) -> None:
        original(self, state, request_tokens, token_budget, removed)
        if state.remaining_prefill_tokens and len(request_tokens) > token_budget:
            # the next chunk starts one token early: the boundary token is prefilled twice
            state.remaining_prefill_tokens = [state.tokens_to_process[-1], *state.remaining_prefill_tokens]
    return _schedule_request


def _resumed_at_stale_position(original: Any) -> Any:
    def create_equivalent_initial_request(self: Any) -> Any:
        fresh = original(self)
        fresh.position_offset = len(self.initial_tokens)  # the old prompt's end: stale after generating
        return fresh
    return create_equivalent_initial_request


def _dedupe_releases_kept_block(original: Any) -> Any:
    from_module = import_transformers("generation.continuous_batching.cache_allocators.cache_allocator")

    def mark_complete_blocks(self: Any, request_id: str, token_ids: list[int], new_new_blocks: int) -> None:
        table, parent = self.block_table[request_id], None
        for i, block in enumerate(table):
            block_hash = self.ledger.block_to_hash.get(block)
            if block_hash is None:
                tokens = token_ids[i * self.tokens_per_page: (i + 1) * self.tokens_per_page]
                if new_new_blocks == 0 or len(tokens) < self.tokens_per_page:
                    break
                block_hash = from_module.compute_block_hash(parent, tokens)
                new_new_blocks -= 1
                identical = self.ledger.register_new_hash(block, block_hash)
                if identical is not None:
                    self.ledger.acquire(identical)
                    table[i] = identical
                    if self.ledger.release(identical):  # releases the block it keeps, not the duplicate
                        self.pool.free_blocks(self.index, [identical])
            parent = block_hash
    return mark_complete_blocks


#: The mutants by name.
MUTANTS: dict[str, EngineMutant] = {m.name: m for m in (
    EngineMutant("shared_block_freed_while_read", "a finished request returns every block to the pool, shared and "
                 "hashed ones too: another request still reads them, and the next allocation overwrites them",
                 "cache_allocators.cache_allocator", "CacheAllocator", "free_blocks", _free_ignoring_sharing),
    EngineMutant("prefix_hash_ignores_last_token", "a block's hash leaves out its last token: prompts that differ "
                 "only there share a block with the wrong content", "cache_allocators.cache_allocator", "",
                 "compute_block_hash", _hash_without_last_token),
    EngineMutant("sliding_wraps_early", "the sliding allocator's ring buffer wraps at window - 1 slots: the oldest "
                 "token still in the window is overwritten", "cache_allocators.sliding_attention",
                 "SlidingAttentionCacheAllocator", "_token_indices_to_physical_indices", _ring_one_short),
    EngineMutant("chunk_written_at_page_start", "a prefill chunk that starts mid-page is written at the page's "
                 "start, over the tokens already there", "cache_allocators.full_attention",
                 "FullAttentionCacheAllocator", "get_write_indices", _chunk_at_page_start),
    EngineMutant("chunk_repeats_boundary_token", "the scheduler starts the next prefill chunk one token early: the "
                 "boundary token is prefilled twice", "scheduler", "Scheduler", "_schedule_request",
                 _chunk_repeats_token),
    EngineMutant("preempted_resumes_stale", "a soft-reset (preempted) request comes back with its old prompt's "
                 "end as position offset: re-prefilled at the wrong positions", "requests", "RequestState",
                 "create_equivalent_initial_request", _resumed_at_stale_position),
    EngineMutant("dedupe_releases_kept_block", "de-duplicating a completed block releases the block kept instead "
                 "of the duplicate: its reference count drops while two requests read it",
                 "cache_allocators.cache_allocator", "CacheAllocator", "mark_complete_blocks",
                 _dedupe_releases_kept_block),
)}


def get_mutant(name: str) -> EngineMutant:
    """The mutant named ``name``, or ValueError naming them all."""
    if name not in MUTANTS:
        raise ValueError(f"unknown engine mutant {name!r}; expected one of: {', '.join(MUTANTS)}")
    return MUTANTS[name]
