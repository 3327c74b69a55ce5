"""Rows of a left-padded batch are independent: each is what it would be generated alone."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from kvverify.checks.case import Case, build_model
from kvverify.checks.expected import expected_generation
from kvverify.checks.property import Property, expect_same, strict_cases
from kvverify.checks.target import Target
from kvverify.engine.generation import generate
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import Generation, ReferenceModel

#: The padding token's id in a padded case: its embedding is zero, as with ``nn.Embedding(padding_idx=0)``.
PAD_ID = 0


@dataclass(frozen=True)
class PaddedBatch:
    """case: the batch; zero_pad_embedding: the model's padding token (id 0, placed in every padded slot)
    has an all-zero embedding, so under RMSNorm without learned positions its keys are exactly zero."""

    case: Case
    zero_pad_embedding: bool

    def describe(self) -> str:
        pad = "token 0 with a zero embedding (padding_idx=0)" if self.zero_pad_embedding else "random tokens"
        return f"{self.case.describe()}\nleft padding holds {pad}; each row is also generated alone"

    def model(self) -> ReferenceModel:
        return _zero_pad_model(self.case) if self.zero_pad_embedding else self.case.model()


def _zero_pad_model(case: Case) -> ReferenceModel:
    """The case's model with the padding token's embedding zeroed (memoised, the last 8 used)."""
    return _zero_pad_model_for(case.config, case.seed)


@functools.lru_cache(maxsize=8)
def _zero_pad_model_for(config: ModelConfig, seed: int) -> ReferenceModel:
    model = copy.deepcopy(build_model(config, seed))
    model.tok_embeddings.data[PAD_ID] = 0
    return model


@st.composite
def padded_batches(draw: st.DrawFn, target: Target) -> PaddedBatch:
    # invariant: with zero_pad_embedding every padded slot holds PAD_ID
    most = target.declaration.max_batch_size or 4
    batch = st.integers(2, most) if most >= 2 else st.just(1)
    case = draw(strict_cases(target, batch_size=batch), label="case")
    zero = draw(st.booleans(), label="zero padding embedding")
    if zero:
        padded = zip(case.prompt, case.pad, strict=True)
        rows = tuple(tuple(PAD_ID if i < pad else t for i, t in enumerate(row)) for row, pad in padded)
        case = Case(case.config, rows, case.pad, case.max_new_tokens, case.seed)
    return PaddedBatch(case, zero)


def _row(generation: Generation, row: int) -> Generation:
    return Generation(
        tokens=generation.tokens[row : row + 1],
        logits=generation.logits[row : row + 1],
        sequences=generation.sequences[row : row + 1],
        attention_mask=generation.attention_mask[row : row + 1],
        cache=None,
    )


def check_batch_independence(target: Target, plan: PaddedBatch) -> None:
    case, model = plan.case, plan.model()
    prompt, mask, new = case.tokens(), case.attention_mask(), case.max_new_tokens
    batched = generate(model, prompt, new, cache=target.new_cache(case.config), attention_mask=mask)
    expected = expected_generation(model, prompt, new, mask, batched)
    expect_same(target, case, expected, batched, "cached generation of the left-padded batch differs from uncached",
                label="padded batch")
    if not torch.equal(expected.tokens, batched.tokens):  # split at a near tie: each row alone needs its own path
        expected = model.generate(prompt, new, use_cache=False, attention_mask=mask)
    for row in range(case.batch):
        alone = generate(model,
            prompt[row : row + 1], new, cache=target.new_cache(case.config), attention_mask=mask[row : row + 1]
        )
        what = f"row {row} generated alone (same left padding {case.pad[row]}) differs from row {row} of the batch"
        expect_same(target, case, _row(expected, row), alone, what, label=f"row {row} alone")


BATCH_INDEPENDENCE = Property(
    name="batch_independence",
    summary=(
        "Row i of a left-padded batch equals row i generated alone with the same padding, also when the "
        "padding token's embedding (hence its keys) is exactly zero: writes to the wrong batch row, rows "
        "sharing state, positions not derived from the mask, lengths counted from non-zero slots."
    ),
    needs=frozenset(),
    strategy=padded_batches,
    check=check_batch_independence,
)
