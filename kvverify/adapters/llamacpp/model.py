"""The model the llama.cpp checks run: a llama-shaped reference model, its GGUF file and the matching contexts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvverify.adapters.llamacpp.gguf_export import write_gguf
from kvverify.adapters.llamacpp.session import ContextSpec
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

#: Llama's shape, small: RoPE (theta 10000), RMSNorm (eps 1e-5), SwiGLU, GQA with 4 query and 2 KV heads of 16.
LLAMA_CONFIG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                           max_seq_len=256, dtype=torch.float32)
SEED = 0


@dataclass(frozen=True)
class ExportedModel:
    """The reference model (float32 weights) and its GGUF file; ``spec`` opens llama.cpp contexts on it."""

    reference: ReferenceModel
    spec: ContextSpec

    def reference64(self) -> ReferenceModel:
        """The same float32 weights, computed in float64 (the export check's oracle)."""
        c = self.reference.config
        model = ReferenceModel(c.replace(dtype=torch.float64), seed=SEED)
        with torch.no_grad():
            for mine, theirs in zip(model.parameters(), self.reference.parameters(), strict=True):
                mine.copy_(theirs.to(torch.float64))
        return model


def export(directory: str | Path, *, config: ModelConfig = LLAMA_CONFIG, seed: int = SEED) -> ExportedModel:
    """Build the reference model and write it as ``directory/reference.gguf``."""
    reference = ReferenceModel(config, seed=seed)
    path = write_gguf(reference.weights(), Path(directory) / "reference.gguf")
    return ExportedModel(reference, ContextSpec(path=path, n_ctx=config.max_seq_len))
