"""The reference model's weights as a float32 GGUF file of llama.cpp's ``llama`` architecture (the ``gguf`` package).

llama.cpp's ``llama`` graph is the reference model's shape when the config has RoPE, RMSNorm, SwiGLU and no
sliding window: pre-norm blocks, grouped-query attention, an untied LM head. Two conventions differ and are
converted here, as llama.cpp's own ``convert_hf_to_gguf.py`` converts a Hugging Face Llama:

- RoPE layout: the reference rotates the halves of a head (``rotate_half``, transformers' "neox" layout); llama.cpp's
  ``llama`` rotates adjacent pairs. The rows of ``wq`` and ``wk`` are permuted within each head (pair ``i`` of the
  halves, dims ``i`` and ``i + D/2``, becomes dims ``2i, 2i+1``); q·k is unchanged, since both are permuted alike.
- Shapes: a torch weight ``(d_out, d_in)`` is written as the numpy array it is; GGUF stores it as ggml ``ne = [d_in,
  d_out]``, the layout llama.cpp's matmuls expect.

The vocabulary is a SentencePiece-style list (``<unk>``, ``<s>``, ``</s>``, then byte tokens ``<0x00>`` ...) that
only gives each id a name: the checks evaluate token ids, never text.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from kvverify.adapters import import_library
from kvverify.protocol.config import ModelConfig
from kvverify.reference.weights import ModelWeights

INSTALL_HINT = "pip install 'kvverify[llama-cpp-python]' (gguf, llama-cpp-python 0.3.36; see tox -e lib-llamacpp)"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 6 byte
TOKEN_TYPES = {"<unk>": 2, "<s>": 3, "</s>": 3}
BYTE_TOKEN = 6
NORMAL_TOKEN = 1


class ExportError(ValueError):
    """A config llama.cpp's ``llama`` architecture cannot express."""


def import_gguf() -> ModuleType:
    """The ``gguf`` package, or an ImportError that says what to install."""
    return import_library("gguf", needs="the gguf package", install=INSTALL_HINT, who="the GGUF export")


def check_exportable(config: ModelConfig) -> None:
    """Raise :class:`ExportError` naming the field when ``config`` is not a llama.cpp ``llama`` model."""
    wanted = {"positional": "rope", "norm": "rms", "sliding_window": None}
    for field, value in wanted.items():
        if getattr(config, field) != value:
            raise ExportError(
                f"ModelConfig.{field} is {getattr(config, field)!r}; llama.cpp's llama architecture needs {value!r} "
                f"(RoPE, RMSNorm, no sliding window): export a config with {field}={value!r}")
    if config.vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ExportError(f"ModelConfig.vocab_size is {config.vocab_size}; the GGUF vocabulary needs at least "
                          f"{len(SPECIAL_TOKENS) + 1} tokens (3 special ones and one more)")


def rope_rows_to_llamacpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of ``wq`` or ``wk`` (n_heads * D, d_model) from the halves layout to llama.cpp's adjacent pairs.

    Within a head, row order becomes 0, D/2, 1, D/2 + 1, ... (convert_hf_to_gguf.py's ``permute``).
    """
    rows, d_in = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, d_in).transpose(1, 2).reshape(rows, d_in)


def vocabulary(size: int) -> tuple[list[str], list[int]]:
    """Token names and llama.cpp token types for ``size`` ids: 3 special tokens, up to 256 byte tokens, then
    normal ones."""
    n_bytes = min(256, size - len(SPECIAL_TOKENS))
    names = [*SPECIAL_TOKENS, *(f"<0x{i:02X}>" for i in range(n_bytes))]
    types = [TOKEN_TYPES[name] for name in SPECIAL_TOKENS] + [BYTE_TOKEN] * n_bytes
    extra = size - len(names)
    return names + [f"<t{i}>" for i in range(extra)], types + [NORMAL_TOKEN] * extra


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def write_gguf(weights: ModelWeights, path: str | Path, *, n_ctx: int | None = None) -> Path:
    """Write ``weights`` as a float32 GGUF model at ``path``; returns the path.

    n_ctx: the context length written to the file (default: ``config.max_seq_len``).
    """
    c = weights.config
    check_exportable(c)
    gguf = import_gguf()
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("kvverify reference model")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(n_ctx or c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    names, types = vocabulary(c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(names)
    writer.add_token_scores([0.0] * len(names))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    writer.add_tensor("token_embd.weight", _f32(weights.tok_embeddings))  # (vocab, d_model)
    for i, layer in enumerate(weights.layers):
        prefix = f"blk.{i}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", _f32(layer.attn_norm.weight))  # (d_model,)
        writer.add_tensor(f"{prefix}.attn_q.weight", _f32(rope_rows_to_llamacpp(layer.wq, c.n_heads)))
        writer.add_tensor(f"{prefix}.attn_k.weight", _f32(rope_rows_to_llamacpp(layer.wk, c.n_kv_heads)))
        writer.add_tensor(f"{prefix}.attn_v.weight", _f32(layer.wv))  # (Hkv * D, d_model)
        writer.add_tensor(f"{prefix}.attn_output.weight", _f32(layer.wo))  # (d_model, H * D)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", _f32(layer.mlp_norm.weight))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", _f32(layer.w_gate))  # (d_ff, d_model)
        writer.add_tensor(f"{prefix}.ffn_up.weight", _f32(layer.w_up))
        writer.add_tensor(f"{prefix}.ffn_down.weight", _f32(layer.w_down))  # (d_model, d_ff)
    writer.add_tensor("output_norm.weight", _f32(weights.final_norm.weight))
    writer.add_tensor("output.weight", _f32(weights.lm_head))  # (vocab, d_model)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
