"""The cache protocol: what a KV cache must do for kvverify (and transformers) to drive it.

It is the subset of ``transformers.Cache`` that a decoder needs, so transformers' cache objects plug in
unchanged and a cache written against this protocol plugs into transformers' models.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from kvverify.protocol.config import ModelConfig
from kvverify.protocol.declaration import normalised, refuse_attribute
from kvverify.protocol.eviction import Eviction
from kvverify.protocol.quantizers import Quantizer

#: Optional methods, detected on each cache rather than assumed.
OPTIONAL_METHODS: tuple[str, ...] = ("crop", "reorder_cache", "reset")


def written_slots(keys: torch.Tensor, values: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``update`` returned, cut to the tokens it holds, by the S-vs-N rule of :class:`KVCache`: the first
    N slots of a preallocated buffer (S > N); everything otherwise (S == N, or the newest S < N of a window).

    keys, values: (B, Hkv, S, D) -> (B, Hkv, S', D) with S' = min(S, N); slot i holds token N - S' + i.
    """
    if keys.shape[-2] > total:
        return keys[:, :, :total], values[:, :, :total]
    return keys, values


@dataclass(frozen=True)
class KVMismatch:
    """How keys or values a cache returns or holds differ from what a model of the config writes: ``kind`` is
    ``shape``, ``dtype`` or ``device``; ``got`` and ``expected`` are spelled for a message."""

    kind: Literal["shape", "dtype", "device"]
    got: str
    expected: str


def kv_mismatch(config: ModelConfig, tensor: torch.Tensor, *, batch: int | None = None, any_group: bool = False,
                dtype_and_device: bool = True) -> KVMismatch | None:
    """The one check of a cache's keys or values against the model: (batch, n_kv_heads, seq, head_dim) (with
    ``any_group``, any head count dividing n_heads), the model's dtype and device; None when they match."""
    shape = tuple(tensor.shape)
    if len(shape) == 4:
        heads_ok = config.n_heads % shape[1] == 0 if any_group and shape[1] > 0 else shape[1] == config.n_kv_heads
        shape_ok = heads_ok and shape[3] == config.head_dim and (batch is None or shape[0] == batch)
    else:
        shape_ok = False
    if not shape_ok:
        rows = "batch" if batch is None else f"batch={batch}"
        return KVMismatch("shape", str(shape), f"({rows}, n_kv_heads={config.n_kv_heads}, seq, "
                                               f"head_dim={config.head_dim})")
    if not dtype_and_device:
        return None
    if tensor.dtype != config.dtype:
        return KVMismatch("dtype", str(tensor.dtype), str(config.dtype))
    model = torch.device(config.device)
    held = tensor.device
    if not (held.type == model.type and (held.index is None or model.index is None or held.index == model.index)):
        return KVMismatch("device", str(held), str(config.device))
    return None


def resolve_crop(max_length: int, length: int) -> int:
    """The crop rule (transformers'): ``crop(max_length)`` of a cache holding ``length`` tokens keeps
    ``max_length`` tokens, or drops ``-max_length`` from the end when negative, clamped to ``0 .. length``."""
    keep = length + max_length if max_length < 0 else max_length
    return max(0, min(keep, length))


@runtime_checkable
class KVCache(Protocol):
    """A key/value cache for a decoder-only transformer.

    Tensors are laid out ``(batch, n_kv_heads, seq, head_dim)``. Keys arrive with positions already applied
    (RoPE is applied before caching) and with ``n_kv_heads`` heads: grouped-query heads are repeated by the
    model after reading, never before writing.

    ``update(key_states, value_states, layer_idx, cache_kwargs=None) -> (keys, values)``
        Append ``seq`` new tokens (one when decoding; many for a prefill, a chunk or draft tokens) to layer
        ``layer_idx`` and return what that layer now holds, oldest first. ``cache_kwargs["cache_position"]``
        is a LongTensor ``(seq,)`` with the absolute index of each new token (``0`` is the first token the
        cache ever saw). The model reads the returned length ``S`` against the ``N`` tokens written so far:

        - ``S == N``: slot ``i`` holds token ``i`` (a concatenating or paged cache);
        - ``S > N``: a preallocated buffer; slots ``N..S-1`` are unwritten and are masked out;
        - ``S < N``: the cache kept only the newest ``S`` tokens (a sliding window); slot ``i`` holds token
          ``N - S + i``. Returning fewer than the window needs is a bug the suite will find.

        Layers are updated in order ``0..n_layers-1`` within each forward. Do not modify the tensors passed
        in; return tensors of the model's dtype and device.

    ``get_seq_length(layer_idx=0) -> int``
        The number of tokens written to that layer (for a sliding window: tokens seen, not tokens kept).

    Optional, detected with ``hasattr``:

    ``crop(max_length)``
        Keep the first ``max_length`` tokens; a negative value removes ``-max_length`` tokens from the end
        (transformers' definition). Used for speculative decoding and rollback. A cache that cannot crop
        to a given length raises ``ValueError``.
    ``reorder_cache(beam_idx)``
        Row ``i`` becomes old row ``beam_idx[i]`` (beam search); rows may be duplicated or dropped.
    ``reset()``
        Forget everything; the cache behaves as new.
    """

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class CacheFactory(Protocol):
    """Builds a fresh, empty cache for a model of the given configuration."""

    def __call__(self, config: ModelConfig) -> KVCache: ...


def capabilities(cache: object) -> frozenset[str]:
    """The optional methods a cache offers (a subset of :data:`OPTIONAL_METHODS`)."""
    return frozenset(name for name in OPTIONAL_METHODS if callable(getattr(cache, name, None)))


class Unsupported(Exception):
    """Raised by a cache (its factory, or any method) for a shape it does not support, e.g.
    ``raise kvverify.Unsupported("head_dim 96: kernels for 64 and 128 only")``. The suite skips that example
    and reports how many it skipped and why; a property none of whose examples ran says so. Prefer declaring
    the shapes supported (:class:`CacheDeclaration`): the suite then draws only those."""


@dataclass(frozen=True)
class CacheDeclaration:
    """What a cache says about itself, read from an optional ``kvverify_declaration`` attribute on the cache
    object or on its factory. Anything left at None is detected by trying it. Every field is checked when the
    declaration is built and again when the suite reads it (:mod:`kvverify.protocol.declaration` holds the rules); a
    wrong value raises :class:`~kvverify.protocol.declaration.DeclarationError` naming the field.

    lossy_atol: the cache is lossy (quantized, compressed); logits are compared within this absolute tolerance
        instead of bit for bit, and greedy tokens may differ only where the reference's top two logits are closer.
    sliding_window: the window the cache implements; the suite then only builds models with that window.
    max_batch_size: the largest batch the cache takes.
    max_seq_len: the most tokens it holds.
    crop_argument: what ``crop(n)`` means: ``"keep"`` the first n tokens (the protocol's meaning, as in
        transformers 4) or ``"remove"`` -n tokens (transformers 5); see :mod:`kvverify.checks.cropping`.
    devices: where the cache runs, e.g. ``("cuda",)`` for a cache of CUDA kernels (``"cuda"`` covers every GPU,
        ``"cuda:1"`` one); asking the suite for another device is a usage error. None: any device.
    head_dims: the head dimensions it takes, e.g. ``(64, 128)``; models are drawn with those only.
    dtypes: the dtypes it takes, e.g. ``(torch.bfloat16, torch.float16)`` (names such as ``"bfloat16"`` too).
    batch_sizes: the exact batch sizes it takes, e.g. ``(1,)`` or ``(4,)``; every case has one of them, and a
        factory with a ``batch_size`` parameter is called ``factory(config, batch_size=B)``.
    block_size: its page size; lengths are drawn around multiples of it (a page boundary crossed by one
        token and by a multi-token append).
    positional: ``"rope"`` for a cache that applies RoPE itself: ``update`` receives keys *before* rotation,
        ``cache_kwargs`` carries ``cos`` and ``sin`` ``(B, T, head_dim)`` beside ``cache_position``, and it
        returns rotated keys (``k * cos + rotate_half(k) * sin``, transformers' Llama layout). Models are then
        drawn with RoPE and without left padding; see :mod:`kvverify.checks.positional`.
    quantizer: a lossy cache's quantizer (:class:`~kvverify.protocol.Quantizer`: a built-in one, or the cache's
        own round trip and when it applies it); ``cached_equals_uncached`` then compares with the reference run
        through the same quantizer (:mod:`kvverify.checks.replay`), bit for bit where the replay is exact, instead
        of within ``lossy_atol``.
    compile: the cache is meant to run inside ``torch.compile`` and CUDA graphs (a static cache): the
        ``compiled`` property then checks it (see :mod:`kvverify.checks.properties.compiled`).
    keeps: the cache keeps a subset of its tokens after the prefill (KV compression), by the declared
        :class:`~kvverify.protocol.eviction.Eviction`, and offers ``kept_positions(layer_idx)``;
        ``cached_equals_uncached`` and ``continuation`` then compare it with the reference attending to exactly the
        tokens it kept (:mod:`kvverify.checks.eviction`); the properties that compare with full recomputation are
        skipped.
    """

    lossy_atol: float | None = None
    sliding_window: int | None = None
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    crop_argument: Literal["keep", "remove"] | None = None
    devices: tuple[str, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    block_size: int | None = None
    positional: Literal["rope"] | None = None
    quantizer: Quantizer | None = None
    compile: bool = False
    keeps: Eviction | None = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in normalised(values).items():
            object.__setattr__(self, name, value)

    @property
    def largest_batch(self) -> int | None:
        """The largest batch the cache takes (None: no limit declared)."""
        return max(self.batch_sizes) if self.batch_sizes else self.max_batch_size  # batch_sizes <= max_batch_size

    def describe(self) -> str:
        """The declared fields, as a constructor call would spell them: ``CacheDeclaration(head_dims=(64,))``."""
        shown = ", ".join(f"{f.name}={_spelled(getattr(self, f.name))}" for f in fields(self)
                          if getattr(self, f.name) != f.default)
        return f"CacheDeclaration({shown})"


def _spelled(value: object) -> str:
    if isinstance(value, tuple):
        inner = ", ".join(_spelled(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else repr(value)


def declaration_of(*objects: object) -> CacheDeclaration:
    """The first ``kvverify_declaration`` found on the objects (a cache, its factory), checked again, else an
    empty one. Raises :class:`~kvverify.protocol.declaration.DeclarationError` for an attribute that is not a
    ``CacheDeclaration`` (a dict, say) or holds a wrong value."""
    for obj in objects:
        declared = getattr(obj, "kvverify_declaration", None)
        if declared is None:
            continue
        if not isinstance(declared, CacheDeclaration):
            raise refuse_attribute(obj, declared)
        normalised({f.name: getattr(declared, f.name) for f in fields(declared)})  # changed after it was built?
        return declared
    return CacheDeclaration()
