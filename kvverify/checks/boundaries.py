"""Where operations should land: the lengths at which caches break most.

A crop to a whole number of pages, a fork while the last page is partly filled, a multi-token append across the
end of an allocation chunk: uniform draws over a few hundred lengths rarely land there. The strategies aim the
crop arguments, the fork, reorder and reset points, chunk edges and continuation lengths at a mark, one before
or one after, half the time. The marks: multiples of the declared ``block_size`` (16 and 64 when none is
declared), the allocation chunks engines use (128, 256, 512), multiples of the window, and ``max_seq_len``.

>>> near_marks(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, max_seq_len=40), 10, 40)
[15, 16, 17, 31, 32, 33, 39, 40]
"""

from __future__ import annotations

from hypothesis import strategies as st

from kvverify.protocol.config import ModelConfig

#: Page sizes aimed at when a cache declares none.
DEFAULT_BLOCKS: tuple[int, ...] = (16, 64)
#: Allocation chunks of serving engines, aimed at whatever the cache declares.
ENGINE_CHUNKS: tuple[int, ...] = (128, 256, 512)


def marks(config: ModelConfig, block_size: int | None = None) -> list[int]:
    """The boundaries up to ``max_seq_len``: block multiples, engine chunks, window multiples, the buffer's end."""
    longest = config.max_seq_len
    blocks = (block_size,) if block_size else DEFAULT_BLOCKS
    found = {b * k for b in blocks for k in range(1, longest // b + 1)} | set(ENGINE_CHUNKS) | {longest}
    if config.sliding_window is not None:
        found |= {config.sliding_window * k for k in (1, 2, 3)}
    return sorted(m for m in found if m <= longest)


def near_marks(config: ModelConfig, low: int, high: int, block_size: int | None = None) -> list[int]:
    """Lengths within [low, high] one before, at, or one after a mark."""
    return sorted({m + d for m in marks(config, block_size) for d in (-1, 0, 1) if low <= m + d <= high})


def at_marks(config: ModelConfig, low: int, high: int, block_size: int | None = None) -> st.SearchStrategy[int]:
    """Lengths within [low, high] on a mark (half the time) or one either side of one; nothing when none lies
    there (``st.nothing()``, which ``|`` drops)."""
    near = near_marks(config, low, high, block_size)
    if not near:
        return st.nothing()
    exact = [m for m in marks(config, block_size) if low <= m <= high]
    return (st.sampled_from(exact) if exact else st.nothing()) | st.sampled_from(near)


def aimed(config: ModelConfig, low: int, high: int, block_size: int | None = None) -> st.SearchStrategy[int]:
    """Integers in [low, high]: at or next to a mark half the time (when one lies there), uniform otherwise."""
    return at_marks(config, low, high, block_size) | st.integers(low, high)
