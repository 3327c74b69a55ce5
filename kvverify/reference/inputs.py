"""Checks on what a caller hands the reference model: clear errors instead of tracebacks from inside torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvverify.protocol.cache import KVCache, kv_mismatch
from kvverify.protocol.config import ModelConfig


class InputError(ValueError):
    """An argument to the reference model is malformed; the message says what was expected and what came."""


#: Reads what a cache holds: (keys, values) per layer, each pair read only if it is two 4-d tensors.
LayoutReader = Callable[[object], Sequence[tuple[object, object]]]

#: (accepts, read, exact) for the caches whose tensors a room above knows how to read, registered by that room
#: (the built-in caches, the transformers bridge). ``exact``: the dtype and device are checked too (a cache
#: that may quantize or offload a layer is read for its shapes only).
_LAYOUT_READERS: list[tuple[Callable[[object], bool], LayoutReader, bool]] = []


def register_layout_reader(accepts: Callable[[object], bool], read: LayoutReader, *, exact: bool) -> None:
    """Let :func:`check_cache_layout` read the caches ``accepts`` says yes to, with ``read``."""
    _LAYOUT_READERS.append((accepts, read, exact))


def check_generate_inputs(
    config: ModelConfig,
    prompt: object,
    max_new_tokens: object,
    attention_mask: object,
    use_cache: bool,
    cache: KVCache | None,
) -> torch.Tensor:
    """Validate the arguments of ``generate`` and return the attention mask (B, T) as a long tensor."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        got = f"{type(prompt).__name__} {getattr(prompt, 'dtype', '')} {tuple(getattr(prompt, 'shape', ()))}"
        raise InputError(f"prompt must be a (batch, seq) torch.long tensor; got {got.strip()}.")
    batch, length = prompt.shape
    if batch < 1 or length < 1:
        raise InputError(f"prompt must hold at least one token in one row; got shape {tuple(prompt.shape)}.")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}.")
    if batch > config.max_batch_size:
        raise InputError(
            f"prompt has batch {batch} but config.max_batch_size is {config.max_batch_size}; "
            "raise max_batch_size or split the batch."
        )
    if length + max_new_tokens - 1 > config.max_seq_len:
        raise InputError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} needs {length + max_new_tokens - 1} "
            f"positions but config.max_seq_len is {config.max_seq_len}; raise max_seq_len or generate less."
        )
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= config.vocab_size:
        raise InputError(f"prompt token ids must lie in [0, {config.vocab_size}); got ids from {low} to {high}.")
    if attention_mask is None:
        mask = torch.ones_like(prompt)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(prompt.shape):
            shape = tuple(getattr(attention_mask, "shape", ()))
            got = str(shape) if shape else type(attention_mask).__name__
            raise InputError(f"attention_mask must have the prompt's shape {tuple(prompt.shape)}; got {got}.")
        mask = attention_mask.long()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token).")
        if not bool((mask.diff(dim=1) >= 0).all()) or not bool(mask[:, -1].all()):
            raise InputError(
                "attention_mask must describe left padding: zeros, then ones, with a token in the last column."
            )
    if not use_cache and cache is not None:
        raise InputError("a cache was passed with use_cache=False; pass use_cache=True or drop the cache.")
    if cache is not None:
        past = _seq_length(cache)
        if not isinstance(past, int) or past < 0 or past >= length:
            raise InputError(
                f"the cache holds {past!r} tokens but the prompt has {length}: pass the whole sequence "
                "(the tokens the cache holds, then at least one new token)."
            )
        if past > 0:
            _check_layer_lengths(config, cache, past)
        check_cache_layout(config, cache)
    return mask.to(prompt.device)


def _check_layer_lengths(config: ModelConfig, cache: KVCache, past: int) -> None:
    """Every layer of the model holds ``past`` tokens, and the cache no layer beyond the model's."""
    for layer_idx in range(1, config.n_layers):
        held = _seq_length(cache, layer_idx)
        if held != past:
            raise InputError(
                f"the cache holds {past} tokens in layer 0 but {held!r} in layer {layer_idx}; the model "
                f"(n_layers={config.n_layers}) expects every layer to hold the same tokens. Was the cache built "
                "for a model with fewer layers? Pass a cache built for this model's config."
            )
    try:
        beyond = _seq_length(cache, config.n_layers)
    except Exception:  # no such layer: as it should be
        return
    if isinstance(beyond, int) and beyond > 0:
        raise InputError(
            f"the cache holds {beyond} tokens in layer {config.n_layers}, but the model has n_layers="
            f"{config.n_layers} (layers 0..{config.n_layers - 1}): it was filled by a model with more layers. "
            "Pass a cache built for this model's config."
        )


def _seq_length(cache: KVCache, layer_idx: int = 0) -> object:
    past: object = cache.get_seq_length(layer_idx)
    if isinstance(past, torch.Tensor) and past.numel() == 1 and not past.is_floating_point():
        past = int(past)  # transformers' static caches return a 0-d tensor
    return past


def check_cache_start(config: ModelConfig, cache: KVCache, start: int) -> None:
    """For ``forward(tokens, cache=cache, start=start)``: the cache must hold exactly the ``start`` tokens before
    the new ones, and (where kvverify can read it) hold keys and values shaped for this model."""
    past = _seq_length(cache)
    if past != start:
        raise InputError(
            f"the cache holds {past!r} tokens but forward() was asked to write the new tokens at slot start={start}; "
            "the model expects start == cache.get_seq_length(). Pass start=cache.get_seq_length(), or a fresh cache "
            "with start=0."
        )
    check_cache_layout(config, cache)


def check_cache_layout(config: ModelConfig, cache: KVCache) -> None:
    """The layers, KV heads, head_dim, dtype and device of what a cache holds against what the model writes, for
    the caches whose tensors kvverify knows how to read (its own, transformers'); other caches are checked on
    what their ``update`` returns (:func:`check_cache_output`)."""
    layers, ours = _held_layers(cache)
    if all(pair is None for pair in layers):
        return  # nothing allocated yet: nothing to compare
    if len(layers) != config.n_layers:
        plural = "s" if len(layers) > 1 else ""
        raise InputError(
            f"the cache holds {len(layers)} layer{plural} but the model has n_layers={config.n_layers}; it was built "
            "for another model. Pass a cache built for this model's config, or a fresh one."
        )
    for layer_idx, pair in enumerate(layers):
        if pair is not None:
            _check_kv(config, *pair, f"the cache's layer {layer_idx} holds", dtype_and_device=ours)


def check_cache_output(config: ModelConfig, result: object, layer_idx: int) -> None:
    """What ``cache.update`` returned for a layer: a (keys, values) pair of (B, n_kv_heads, S, head_dim) tensors
    of the model's dtype, on its device."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and isinstance(result[0], torch.Tensor) and isinstance(result[1], torch.Tensor)):
        raise InputError(
            f"the cache's update() returned {type(result).__name__} for layer {layer_idx}; the model expects a "
            "(keys, values) pair of tensors (see kvverify.KVCache)."
        )
    _check_kv(config, result[0], result[1], f"the cache's update() returned for layer {layer_idx}", any_group=True)
    if result[0].shape[-2] == 0 or result[1].shape[-2] == 0:
        raise no_keys_returned(f"layer {layer_idx}")


def no_keys_returned(where: str) -> InputError:
    """The error for a cache whose ``update`` returned no keys: a query must see at least the token it wrote."""
    return InputError(
        f"the cache's update() returned no keys for {where}, right after the model wrote to it; expected every "
        "token it holds (the newest ones with a sliding window), at least the ones just written."
    )


def _check_kv(config: ModelConfig, keys: torch.Tensor, values: torch.Tensor, what: str, *,
              dtype_and_device: bool = True, any_group: bool = False) -> None:
    """any_group: accept any head count that divides n_heads (what attention can read; repeating KV heads before
    caching wastes memory but gives the same logits, which the suite's contract reports, not the model)."""
    for name, tensor in (("keys", keys), ("values", values)):
        wrong = kv_mismatch(config, tensor, any_group=any_group, dtype_and_device=dtype_and_device)
        if wrong is None:
            continue
        if wrong.kind == "shape":
            raise InputError(f"{what} {name} of shape {wrong.got}, but the model expects {wrong.expected}: the cache "
                             "was built for another model. Pass a cache built for this model's config.")
        if wrong.kind == "dtype":
            raise InputError(f"{what} {name} of dtype {wrong.got}, but the model computes in {wrong.expected}. "
                             "Pass a cache built for this model's config (its dtype).")
        raise InputError(f"{what} {name} on {wrong.got}, but the model is on {wrong.expected}. Pass a cache "
                         "built on the model's device.")


def _held_layers(cache: object) -> tuple[list[tuple[torch.Tensor, torch.Tensor] | None], bool]:
    """(keys, values) per layer (None where not allocated yet) of a cache a registered reader can read, also
    inside a wrapper that keeps it as ``inner`` (the suite's contract check); else ``[]``. The flag is the
    reader's ``exact``."""
    while cache is not None:
        for accepts, read, exact in _LAYOUT_READERS:
            if accepts(cache):
                held: list[tuple[torch.Tensor, torch.Tensor] | None] = [
                    (k, v) if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4
                    else None
                    for k, v in read(cache)
                ]  # transformers' quantized layers keep an empty 1-d placeholder between flushes: not a layout
                return held, exact
        cache = getattr(cache, "inner", None)
    return [], True
