"""Generation with the engine: :meth:`ReferenceModel.generate`'s cached path, with every single-token step of
an unpadded batch run by the engine's decode step: :class:`~kvverify.engine.decode.DecodeStep` in fast numerics,
:class:`~kvverify.engine.strict_decode.StrictDecodeStep` (the model's bits, without its per-step Python) in
strict numerics, where the configuration allows it. The suite, the tolerance measurement and the profiles call
this where they generate with a cache; the oracle itself never calls the engine."""

from __future__ import annotations

import torch

from kvverify.engine import decode, strict_decode
from kvverify.protocol.cache import KVCache
from kvverify.reference.model import DecodeStepFn, Generation, ReferenceModel


def generate(
    model: ReferenceModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    cache: KVCache | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Generation:
    """``model.generate(prompt, max_new_tokens, cache=cache, attention_mask=attention_mask)``, decoding with the
    engine (configs it does not support, ALiBi and padded batches, decode with the model).
    prompt: (B, T) long; attention_mask: (B, T) or None. The engine is built from the model's weights as they are
    now, for at most ``T + max_new_tokens`` slots."""
    step: DecodeStepFn | None = None
    unpadded = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and bool(attention_mask.all()))
    kind = decode.DecodeStep if decode.supports(model.config) else (
        strict_decode.StrictDecodeStep if strict_decode.supports(model.config) else None)
    if kind is not None and unpadded and isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        engine = kind(model.weights(), max_len=prompt.shape[1] + max_new_tokens)

        def step(new: torch.Tensor, held: KVCache, past: int) -> torch.Tensor | None:
            return engine(new, held, past) if past < engine.max_len else None

    return model.generate(prompt, max_new_tokens, cache=cache, attention_mask=attention_mask, decode_step=step)
