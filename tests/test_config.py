import pytest
import torch

from kvverify import ConfigError, ModelConfig


def test_derived_fields() -> None:
    c = ModelConfig(d_model=32, n_heads=4)
    assert (c.n_kv_heads, c.head_dim, c.d_ff, c.n_rep) == (4, 8, 128, 1)


def test_gqa_and_mqa() -> None:
    assert ModelConfig(n_heads=8, n_kv_heads=2, d_model=64).n_rep == 4
    assert ModelConfig(n_heads=8, n_kv_heads=1, d_model=64).n_rep == 8


def test_dtype_by_name() -> None:
    assert ModelConfig(dtype="bfloat16").dtype is torch.bfloat16  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"norm": "batch"}, "norm"),
        ({"positional": "sinusoidal"}, "positional"),
        ({"numerics": "exact"}, "numerics"),
        ({"dtype": "int8"}, "dtype"),
        ({"d_model": 30}, "head_dim"),
        ({"head_dim": 3}, "head_dim"),  # RoPE needs pairs
        ({"sliding_window": 0}, "sliding_window"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"rope_theta": -1.0}, "rope_theta"),
    ],
)
def test_invalid_fields_name_the_field_and_the_rule(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field} must be"):
        ModelConfig(**changes)  # type: ignore[arg-type]


def test_odd_head_dim_is_fine_without_rope() -> None:
    assert ModelConfig(head_dim=3, positional="alibi").head_dim == 3


def test_presets() -> None:
    bench = ModelConfig.preset("bench")
    assert (bench.d_model, bench.n_layers, bench.n_heads, bench.n_kv_heads, bench.vocab_size, bench.d_ff) == (
        256, 4, 8, 2, 1024, 688,
    )
    assert ModelConfig.preset("tiny", n_layers=3).n_layers == 3
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_frozen_and_replace_revalidates() -> None:
    c = ModelConfig()
    with pytest.raises(AttributeError):
        c.n_layers = 3  # type: ignore[misc]
    with pytest.raises(ConfigError):
        c.replace(n_kv_heads=3)
