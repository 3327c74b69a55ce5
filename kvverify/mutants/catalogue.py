"""The catalogue: every deliberately buggy cache, what it gets wrong and what a test needs to see it."""

from __future__ import annotations

from dataclasses import dataclass

from kvverify.mutants import boundaries, layout, long, paged, positions, rollback, static, window
from kvverify.protocol.cache import CacheFactory

#: What a mutant's bug needs before it shows; a mutant's ``needs`` is a subset of these keys.
NEEDS: dict[str, str] = {
    "decode": "two or more decode steps after the prefill",
    "continue": "generation continued from the cache that generate returned",
    "chunk": "a multi-token update on a non-empty cache, or a prefill longer than the sliding window",
    "sliding_window": "a model with a sliding window and a sequence that reaches it",
    "crop": "crop() and then more tokens (crop(0) and negative arguments for some)",
    "reorder_cache": "reorder_cache() with a permutation or duplicated rows, then more tokens",
    "reset": "reset() and then a different, longer sequence through the same cache",
    "batch>1": "two or more rows with different tokens",
    "n_layers>=3": "a model with three or more layers",
    "gqa": "grouped-query attention with n_kv_heads > 1 and n_heads > n_kv_heads",
    "n_kv_heads>1": "more than one KV head",
    "float16": "a float16 model (bfloat16 too)",
    "full": "a sequence of exactly max_seq_len tokens",
    "long": "a sequence decoded past 16 tokens",
    "block_boundary": "a paged row whose block table grows after its first token was written",
    "zero_key": "a token whose key is exactly zero (a zeroed embedding row under RMSNorm)",
    "shape": "a check of the returned (batch, n_kv_heads, seq, head_dim) shape or of memory; logits are unchanged",
    "compile": "the decode step under torch.compile (dynamic=False) or captured in a CUDA graph; logits are unchanged",
    "past_2048": "a sequence longer than 2048 tokens (the long_context property)",
    "fork": "a deepcopy of the cache, then writes to the copy and the original, each read back after the other's",
    "past_128": "a multi-token append that starts before a multiple of 128 tokens and ends after it",
    "page_multiple": "crop() to a whole number of 16-token pages, then more tokens",
    "partial_page": "a fork while the last 16-token page is partly filled",
}

#: The sections of docs/KV_BUGS.md that the catalogue covers.
SECTIONS: tuple[str, ...] = (
    "Sliding window",
    "Positions",
    "Preallocated (static) caches",
    "State between calls",
    "Beam search, crop, rollback",
    "Heads, layers, dtypes, layout",
)


@dataclass(frozen=True)
class Mutant:
    """A cache with one planted bug.

    factory: builds a fresh cache for a model config (the buggy class's ``from_config``); bug: one line;
    reference: the public issue it reproduces (``"transformers #37574"``); section: the docs/KV_BUGS.md section;
    needs: keys of :data:`NEEDS`, the conditions under which the bug shows; parent: the built-in cache it is
    a variant of (its name in :data:`kvverify.caches.BUILTIN_CACHES`).
    """

    name: str
    factory: CacheFactory
    bug: str
    reference: str
    section: str
    needs: frozenset[str]
    parent: str

    def __post_init__(self) -> None:
        unknown = self.needs - NEEDS.keys()
        if unknown:
            raise ValueError(f"mutant {self.name!r} needs unknown conditions {sorted(unknown)}; known: {sorted(NEEDS)}")
        if self.section not in SECTIONS:
            raise ValueError(f"mutant {self.name!r} names section {self.section!r}; expected one of {SECTIONS}")


def _mutant(
    name: str,
    factory: CacheFactory,
    bug: str,
    reference: str,
    section: str,
    needs: set[str],
    parent: str,
) -> tuple[str, Mutant]:
    return name, Mutant(name, factory, bug, reference, section, frozenset(needs), parent)


_WINDOW, _POS, _STATIC = SECTIONS[0], SECTIONS[1], SECTIONS[2]
_STATE, _ROLLBACK, _LAYOUT = SECTIONS[3], SECTIONS[4], SECTIONS[5]

#: Every mutant by name.
MUTANTS: dict[str, Mutant] = dict(
    [
        _mutant("window_rolls_early", window.RollsOneStepEarly.from_config,
                "the ring evicts token 0 when its last free slot is written, leaving a zero slot",
                "transformers #37574", _WINDOW, {"sliding_window", "decode"}, "sliding"),
        _mutant("window_keeps_w_minus_1", window.KeepsWindowMinusOne.from_config,
                "returns W-1 tokens where a query needs itself and the W-1 before it",
                "mlx-lm #390", _WINDOW, {"sliding_window"}, "sliding"),
        _mutant("window_slices_newest", window.SlicesNewestWindow.from_config,
                "returns the newest W keys of old + new: a chunk past the window loses keys",
                "transformers #27682", _WINDOW, {"sliding_window", "chunk"}, "sliding"),
        _mutant("window_start_underfull", window.StartIndexWhileUnderfull.from_config,
                "oldest slot taken as seen % W while the ring is not full",
                "transformers #47708", _WINDOW, {"sliding_window", "decode"}, "sliding"),
        _mutant("window_reset_keeps_pointer", window.ResetKeepsPointer.from_config,
                "reset() empties the ring but keeps its write pointer",
                "LLMs-from-scratch #925", _STATE, {"reset"}, "sliding"),
        _mutant("positions_restart", positions.PositionsRestart.from_config,
                "every update writes from slot 0 instead of cache_position",
                "transformers #15751", _POS, {"decode"}, "static"),
        _mutant("count_advanced_by_layer0", positions.CountAdvancedByLayerZero.from_config,
                "layers place tokens after layer 0's count, which layer 0 already advanced",
                "fla #477", _POS, set(), "static"),
        _mutant("offset_advanced_by_total", positions.OffsetAdvancedByTotal.from_config,
                "the write offset grows by the tokens held instead of the tokens written",
                "skyzh/tiny-llm #46", _POS, {"decode"}, "static"),
        _mutant("static_valid_length_before_scatter", static.ValidLengthBeforeScatter.from_config,
                "the valid length is read before the write: one token short every decode step",
                "onnxruntime mobius #365", _STATIC, {"decode"}, "static"),
        _mutant("static_last_slot_wraps", static.LastSlotWraps.from_config,
                "a write to the last slot is taken for an overflow and wraps to slot 0",
                "executorch #5227", _STATIC, {"full"}, "static"),
        _mutant("static_length_from_nonzero", static.LengthFromNonzeroSlots.from_config,
                "length and write position counted from non-zero key slots",
                "transformers #30377", _STATIC, {"zero_key"}, "static"),
        _mutant("static_first_token_unwritten", static.FirstTokenNeverWritten.from_config,
                "slot 0 is never written",
                "TrenTorch #192", _LAYOUT, set(), "static"),
        _mutant("static_reset_keeps_length", static.ResetKeepsLength.from_config,
                "reset() zeroes the buffers but keeps the lengths",
                "transformers #43952", _STATE, {"reset"}, "static"),
        _mutant("crop_negative_unclamped", rollback.CropNegativeUnclamped.from_config,
                "crop(-n) with n > length is not clamped: crop(-5) on 3 tokens keeps one",
                "transformers #47433", _ROLLBACK, {"crop"}, "contiguous"),
        _mutant("crop_zero_noop", rollback.CropZeroIsNoop.from_config,
                "crop(0) does nothing",
                "transformers #47433", _ROLLBACK, {"crop"}, "contiguous"),
        _mutant("crop_first_layer_only", rollback.CropFirstLayerOnly.from_config,
                "crop trims layer 0 only; rejected drafts stay in later layers",
                "mlx-lm #1109", _ROLLBACK, {"crop"}, "contiguous"),
        _mutant("reorder_keys_only", rollback.ReorderKeysOnly.from_config,
                "reorder_cache reorders the keys and not the values",
                "transformers #48700", _ROLLBACK, {"reorder_cache", "batch>1"}, "contiguous"),
        _mutant("reorder_wrong_axis", rollback.ReorderWrongAxis.from_config,
                "reorder_cache indexes the head axis instead of the batch axis",
                "PaddleNLP #6672", _ROLLBACK, {"reorder_cache", "n_kv_heads>1"}, "contiguous"),
        _mutant("paged_reorder_shares_blocks", paged.ReorderSharesBlocks.from_config,
                "duplicated beams share blocks without copy-on-write",
                "transformers #48700", _ROLLBACK, {"reorder_cache", "batch>1"}, "paged"),
        _mutant("paged_crop_frees_partial_block", paged.CropFreesPartialBlock.from_config,
                "crop frees a partly kept block, which another row then takes",
                "transformers #47433", _ROLLBACK, {"crop", "batch>1"}, "paged"),
        _mutant("paged_block_index_off_by_one", paged.BlockIndexOffByOne.from_config,
                "block looked up as (position - 1) // block_size; token 0 moves when the table grows",
                "flash-attention #772", _LAYOUT, {"block_boundary"}, "paged"),
        _mutant("gqa_repeated_before_cache", layout.RepeatsHeadsBeforeCaching.from_config,
                "GQA heads repeated before caching: the cache holds n_heads heads",
                "SnapKV #16", _LAYOUT, {"gqa", "shape"}, "contiguous"),
        _mutant("gqa_tiled", layout.TilesHeadGroups.from_config,
                "GQA heads regrouped by tiling instead of interleaving",
                "axlearn #842", _LAYOUT, {"gqa"}, "contiguous"),
        _mutant("layer_reads_mod_2", layout.ReadsLayerModTwo.from_config,
                "layer i reads layer i % 2's cache: wrong from layer 2 on",
                "fla #477", _LAYOUT, {"n_layers>=3"}, "contiguous"),
        _mutant("keys_as_values", layout.KeysAsValues.from_config,
                "the key cache is returned as the value cache",
                "ik_llama.cpp #1592", _LAYOUT, set(), "contiguous"),
        _mutant("layout_read_as_old", layout.LayoutReadAsOld.from_config,
                "(batch, heads, seq, dim) read back as (batch, seq, heads, dim)",
                "LMCache #4463", _LAYOUT, {"n_kv_heads>1"}, "contiguous"),
        _mutant("grow_copy_one_short", layout.GrowCopyOneElementShort.from_config,
                "a full 2^k buffer grows by copying numel - 1 elements: one key element zeroed",
                "executorch #5227", _STATIC, {"long"}, "contiguous"),
        _mutant("wrong_batch_row", layout.WrongBatchRow.from_config,
                "row b is written to row batch - 1 - b",
                "flash-attention #772", _LAYOUT, {"batch>1"}, "static"),
        _mutant("dtype_bfloat16_storage", layout.DowncastToBfloat16.from_config,
                "stored in bfloat16 and cast back on read",
                "TransformerLens #1260", _LAYOUT, set(), "static"),
        _mutant("dtype_promoted_float32", layout.PromotedToFloat32.from_config,
                "stored and returned in float32 whatever the model's dtype",
                "torchtune #398", _LAYOUT, {"float16"}, "static"),
        _mutant("dtype_bits_reinterpreted", layout.Bfloat16BitsReadAsFloat16.from_config,
                "bfloat16 bits stored in a float16 buffer and read as float16",
                "vLLM #54338", _LAYOUT, set(), "static"),
        _mutant("compile_buffer_regrown", layout.GrowsByReallocating.from_config,
                "the buffer is reallocated a chunk larger when full: a recompile per growth, a stale CUDA graph",
                "ik_llama.cpp #2096", _STATIC, {"compile", "decode"}, "static"),
        _mutant("compile_length_python_int", layout.LengthAsPythonInt.from_config,
                "the write position is a Python int attribute: compile specialises on it, a recompile every step",
                "torchtune #1663", _STATIC, {"compile", "decode"}, "static"),
        _mutant("position_in_12_bits", long.PositionsInTwelveBits.from_config,
                "positions held in a 12-bit signed field: token 2048 is written over an older slot",
                "vllm-project/tpu-inference #2756", _POS, {"past_2048", "decode"}, "static"),
        _mutant("static_stops_growing_at_2048", long.StopsGrowingAt2048.from_config,
                "a 2048-slot buffer whose write position is clamped: every token past 2048 overwrites the last slot",
                "finnvoor/CoreMLPipelines #3", _STATIC, {"past_2048", "decode"}, "static"),
        _mutant("chunk_growth_drops_straddling_head", boundaries.ChunkGrowthDropsStraddlingHead.from_config,
                "an append across the end of a 128-token chunk loses its head: the growth copies only what was held",
                "EricLBuehler/mistral.rs #917", _STATIC, {"past_128"}, "contiguous"),
        _mutant("paged_crop_to_page_rewinds", boundaries.CropToPageRewindsPointer.from_config,
                "crop to whole 16-token pages rewinds the write pointer a page: the next append overwrites it",
                "RBLN-SW/vllm-rbln #326", _ROLLBACK, {"page_multiple"}, "paged"),
        _mutant("paged_fork_shares_partial_page", boundaries.ForkSharesPartialPage.from_config,
                "a fork shares its partly filled last page instead of copying it: copy and original write one page",
                "Avarok-Cybersecurity/atlas #1193", _STATE, {"fork", "partial_page"}, "paged"),
        _mutant("fork_shares_buffers", long.ForkSharesBuffers.from_config,
                "deepcopy copies the lists but not the tensors: a fork and its original write the same buffers",
                "gpytorch #785", _STATE, {"fork"}, "static"),
    ]
)
