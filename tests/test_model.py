from __future__ import annotations

import pytest
import torch

from kvverify import ContiguousCache, InputError, ModelConfig, ReferenceModel

CONFIG = ModelConfig.preset("tiny", max_seq_len=32, max_batch_size=4)


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(CONFIG, seed=0)


def prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(batch))


def test_generation_shapes(model: ReferenceModel) -> None:
    out = model.generate(prompt(), 4)
    assert out.tokens.shape == (2, 4) and out.logits.shape == (2, 4, CONFIG.vocab_size)
    assert out.sequences.shape == (2, 9) and out.attention_mask.shape == (2, 9)
    assert torch.equal(out.tokens, out.logits.argmax(-1))
    assert out.cache is not None and out.cache.get_seq_length() == 8  # the last token is chosen, never fed


def test_continuing_from_the_returned_cache_equals_generating_at_once(model: ReferenceModel) -> None:
    whole = model.generate(prompt(), 7, use_cache=False)
    first = model.generate(prompt(), 3)
    rest = model.generate(first.sequences, 4, cache=first.cache, attention_mask=first.attention_mask)
    assert torch.equal(torch.cat((first.logits, rest.logits), 1), whole.logits)


def test_left_padding_does_not_change_a_row(model: ReferenceModel) -> None:
    row = prompt(1, 4)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), row), 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    alone = model.generate(row, 5, use_cache=False)
    with_pad = model.generate(padded, 5, attention_mask=mask)
    assert torch.equal(alone.tokens, with_pad.tokens)
    assert torch.allclose(alone.logits, with_pad.logits, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": torch.zeros(2, 3)}, "torch.long"),
        ({"prompt": torch.zeros(3, dtype=torch.long)}, r"\(batch, seq\)"),
        ({"prompt": torch.full((1, 3), 999)}, r"token ids must lie in \[0, 128\)"),
        ({"prompt": torch.zeros(5, 3, dtype=torch.long)}, "max_batch_size is 4"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ({"max_new_tokens": 40}, "max_seq_len is 32"),
        ({"attention_mask": torch.ones(2, 4)}, "attention_mask must have the prompt's shape"),
        ({"attention_mask": torch.tensor([[1, 0, 1, 1, 1]] * 2)}, "left padding"),
        ({"use_cache": False, "cache": ContiguousCache()}, "use_cache=False"),
    ],
)
def test_bad_arguments_say_what_was_expected(model: ReferenceModel, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"prompt": prompt(), "max_new_tokens": 3, **kwargs}
    with pytest.raises(InputError, match=message):
        model.generate(args.pop("prompt"), args.pop("max_new_tokens"), **args)  # type: ignore[arg-type]


def test_a_cache_longer_than_the_prompt_is_refused(model: ReferenceModel) -> None:
    out = model.generate(prompt(), 5)
    with pytest.raises(InputError, match="pass the whole sequence"):
        model.generate(prompt(), 2, cache=out.cache)


def test_weights_are_the_parameters_as_plain_tensors(model: ReferenceModel) -> None:
    weights = model.weights()
    assert weights.config is CONFIG and len(weights.layers) == CONFIG.n_layers
    assert weights.layers[1].w_down.data_ptr() == model.layers[1].mlp.w_down.data_ptr(), "a view, not a copy"
    assert weights.lm_head.shape == (CONFIG.vocab_size, CONFIG.d_model)
    assert weights.final_norm.bias is None and weights.pos_embeddings is None, "RMSNorm and RoPE have neither"
    assert not weights.tok_embeddings.requires_grad


class _Forgetful:
    """A cache that returns what it holds up to ``held`` tokens, and no keys at all after."""

    def __init__(self, held: int) -> None:
        self.inner, self.held = ContiguousCache(), held

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.update(k, v, layer_idx, cache_kwargs)
        return (keys, values) if keys.shape[-2] <= self.held else (keys[:, :, :0], values[:, :, :0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.get_seq_length(layer_idx))


@pytest.mark.parametrize(("numerics", "held", "where"), [
    ("strict", 0, "layer 0"), ("fast", 0, "layer 0"),  # the model's modules, in the prefill
    ("strict", 5, "layer 0"), ("fast", 5, "a decode step at slot 5"),  # the engine's decode steps
])
def test_a_cache_that_returns_no_keys_is_named(numerics: str, held: int, where: str) -> None:
    from kvverify.engine.generation import generate  # the engine's decode steps, as the suite generates

    model = ReferenceModel(CONFIG.replace(numerics=numerics), seed=0)
    with pytest.raises(InputError, match=f"returned no keys for {where},"):
        generate(model, prompt(2, 5), 3, cache=_Forgetful(held))
