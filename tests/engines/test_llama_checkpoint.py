"""The reference model written as a Llama checkpoint (what vLLM serves) holds the same tensors, under the same
names, as transformers' LlamaForCausalLM built by the hf adapter: the two mappings cannot drift apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvverify.engines.llama_checkpoint import check_convertible, llama_config_dict, write_llama_checkpoint
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

CONFIG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
                     rope_theta=500.0, norm_eps=1e-6)


def test_config_json_carries_the_shape(tmp_path: Path) -> None:
    pytest.importorskip("safetensors", reason="writing a checkpoint needs safetensors")
    directory = write_llama_checkpoint(ReferenceModel(CONFIG, seed=1), tmp_path / "model")
    written = json.loads((directory / "config.json").read_text())
    assert written == llama_config_dict(CONFIG), "config.json must be exactly the dict llama_config_dict builds"
    assert (written["hidden_size"], written["num_attention_heads"], written["num_key_value_heads"],
            written["head_dim"], written["intermediate_size"]) == (64, 4, 2, 16, 96)
    assert written["rope_parameters"]["rope_theta"] == 500.0 and written["rms_norm_eps"] == 1e-6
    assert written["eos_token_id"] is None, "no end-of-sequence token: engines must generate every requested token"


@pytest.mark.parametrize(("change", "field"), [
    (dict(positional="alibi"), "positional"),
    (dict(norm="layer"), "norm"),
    (dict(sliding_window=4), "sliding_window"),
    (dict(dtype="float64"), "dtype"),
])
def test_shapes_llama_cannot_hold_are_refused_by_name(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        check_convertible(CONFIG.replace(**change))


def test_tensors_equal_the_hf_adapters_llama_bit_for_bit(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the hf adapter's Llama needs transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from kvverify.adapters.hf.llama import to_llama

    model = ReferenceModel(CONFIG, seed=2)
    written = safetensors_torch.load_file(str(write_llama_checkpoint(model, tmp_path / "m") / "model.safetensors"))
    expected = {name: t for name, t in to_llama(model).state_dict().items() if "rotary_emb" not in name}
    assert sorted(written) == sorted(expected), "the checkpoint's tensor names differ from LlamaForCausalLM's"
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), f"{name} differs from the hf adapter's LlamaForCausalLM"
