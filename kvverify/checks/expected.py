"""The expected (uncached) generation a cached one is compared with, in one teacher-forced forward.

``model.generate(prompt, n, use_cache=False)`` recomputes the whole prefix for each of its ``n`` steps:
O(n²) forwards' worth of attention, which rules out long contexts. A row's uncached logits at slot t depend on
nothing after t, so one forward over the prompt and the tokens the cached run chose gives every step's uncached
logits, as long as the chosen tokens are the ones the recomputation would choose. Where they are not, the
comparison stops there anyway: at the first step a row's token leaves the expected greedy path, its logits
(which depend only on earlier tokens, which agree) already differ, or differ within a tolerance at a near tie,
after which that row is not compared (:func:`kvverify.checks.compare.first_difference`).

In strict numerics that forward gives the step-by-step recomputation's bits: every reduction is a fixed tree
over the keys a query sees, oldest first, and masked keys add only exact zeros (:mod:`kvverify.reference.numerics`;
``tests/test_expected.py`` checks it bit for bit). In fast numerics the kernels choose their order by the
tensor's shape, so a row inside the forward rounds differently from the same row computed alone, as the cached
step does: the comparison is within the dtype's tolerance either way, measured on this forward
(``kvverify measure-tolerance``), and a mismatch is confirmed in strict numerics (:mod:`kvverify.checks.confirm`).
"""

from __future__ import annotations

import torch

from kvverify.reference.model import Generation, ReferenceModel


@torch.no_grad()
def teacher_forced(
    model: ReferenceModel, prompt: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> Generation:
    """The uncached logits of every step of a generation that chose ``tokens``, from one forward.

    prompt: (B, T) long, left-padded where ``attention_mask`` (B, T) has zeros; tokens: (B, N) the tokens
    fed after it (the last one is never fed). Returns a :class:`Generation` whose ``logits[:, i]`` are the
    logits after ``prompt`` and ``tokens[:, :i]`` and whose ``tokens`` are their greedy choices.
    """
    t = prompt.shape[1]
    if tokens.shape[1] < 1:
        raise ValueError(f"teacher_forced needs at least one generated token per row; got tokens of shape "
                         f"{tuple(tokens.shape)}")
    mask = torch.ones_like(prompt) if attention_mask is None else attention_mask
    fed = torch.cat((prompt, tokens[:, :-1]), dim=1)  # (B, T + N - 1)
    fed_mask = torch.cat((mask, torch.ones_like(tokens[:, :-1])), dim=1)
    unpadded = bool(fed_mask.all())
    logits = model(fed, attention_mask=None if unpadded else fed_mask)[:, t - 1 :]  # (B, N, vocab)
    chosen = logits.argmax(-1)  # (B, N)
    return Generation(
        tokens=chosen,
        logits=logits,
        sequences=torch.cat((prompt, chosen), dim=1),
        attention_mask=torch.cat((mask, torch.ones_like(chosen)), dim=1),
        cache=None,
    )


def expected_generation(
    model: ReferenceModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None,
    actual: Generation,
) -> Generation:
    """What ``model.generate(prompt, max_new_tokens, use_cache=False, attention_mask=...)`` gives, wherever a
    comparison with ``actual`` (the cached generation of the same prompt) looks: one teacher-forced forward
    over ``actual``'s tokens (the step-by-step recomputation when ``actual`` has another shape)."""
    if tuple(actual.tokens.shape) == (prompt.shape[0], max_new_tokens):
        return teacher_forced(model, prompt, actual.tokens, attention_mask)
    return model.generate(prompt, max_new_tokens, use_cache=False, attention_mask=attention_mask)
