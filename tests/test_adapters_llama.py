"""The reference model is a real transformer: the same weights in transformers' LlamaForCausalLM give the
same logits within 1e-5 in float32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")

from kvverify.adapters.hf.generation import position_ids_from_mask
from kvverify.adapters.hf.llama import llama_config, to_llama
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

ATOL = 1e-5

SHAPES = {  # n_heads, n_kv_heads
    "MHA": (4, 4),
    "GQA": (4, 2),
    "MQA": (4, 1),
}
CASES = ["MHA-eager", "GQA-eager", "GQA-sdpa", "MQA-sdpa"]  # shape and transformers' attention


def _prompt(config: ModelConfig, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and attention_mask (3, 9); with ``padded`` rows 1 and 2 are left-padded by 3 and 8."""
    tokens = torch.randint(0, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :3], mask[2, :8] = 0, 0
    return tokens, mask


@pytest.mark.parametrize("numerics", ["fast", "strict"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_llama_logits_match_reference(numerics: str, case: str, padded: bool) -> None:
    shape, attn_implementation = case.split("-")
    n_heads, n_kv_heads = SHAPES[shape]
    config = ModelConfig.preset(
        "tiny", n_heads=n_heads, n_kv_heads=n_kv_heads, numerics=numerics, rope_theta=500.0, norm_eps=1e-6
    )
    model = ReferenceModel(config, seed=3)
    llama = to_llama(model, attn_implementation)
    tokens, mask = _prompt(config, padded)

    expected = model(tokens, attention_mask=mask)  # (B, T, vocab)
    with torch.no_grad():
        got = llama(input_ids=tokens, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    real = mask.bool()  # padding positions have no meaning in either model
    error = (got - expected)[real].abs().max().item()
    assert error <= ATOL, f"{shape} {numerics} {attn_implementation}: LlamaForCausalLM differs by {error:.3g} > {ATOL}"
    assert expected[real].abs().max() > 1.0, "logits this small would make the tolerance meaningless"


def test_llama_config_carries_the_shape() -> None:
    config = ModelConfig(d_model=48, n_heads=6, n_kv_heads=2, head_dim=12, d_ff=80, rope_theta=1234.0, norm_eps=1e-4)
    hf = llama_config(config)
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (48, 6, 2, 12)
    assert (hf.intermediate_size, hf.rms_norm_eps, hf.rope_parameters["rope_theta"]) == (80, 1e-4, 1234.0)
    assert not hf.tie_word_embeddings and not hf.attention_bias and not hf.mlp_bias


def test_every_weight_is_copied() -> None:
    """A weight left at transformers' initialisation would show up here before it hides in a tolerance."""
    model = ReferenceModel(ModelConfig.preset("tiny"), seed=1)
    llama = to_llama(model)
    ours = sorted(float(p.double().sum()) for p in model.parameters())
    theirs = sorted(float(p.detach().double().sum()) for p in llama.parameters())
    assert ours == theirs, "the converted model's parameters are not exactly the reference's"


@pytest.mark.parametrize(
    ("field", "value"),
    [("positional", "alibi"), ("positional", "learned"), ("norm", "layer"), ("sliding_window", 8)],
)
def test_unconvertible_config_names_the_field(field: str, value: object) -> None:
    model = ReferenceModel(ModelConfig.preset("tiny", **{field: value}))
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={value!r}.*LlamaForCausalLM"):
        to_llama(model)


def test_unknown_attention_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match="attn_implementation"):
        to_llama(ReferenceModel(ModelConfig.preset("tiny")), "flash_attention_2")
