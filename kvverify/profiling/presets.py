"""Real model sizes for ``kvverify profile --preset``: the shapes of 1B- and 8B-class Llama models in bfloat16
(1.6 and 15 GB of weights read per token), and what a sweep over them measures (contexts to 32k, batches 1
to 64). GPU only.

As gpt-fast's ``transformer_configs``, a preset is a tiny dict over :class:`~kvverify.protocol.config.ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvverify.protocol.config import ModelConfig

#: name -> ModelConfig fields (head_dim = d_model / n_heads: 64 for 1b, 128 for 8b).
PRESETS: dict[str, dict[str, object]] = {
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=5632),
    "8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
}
#: Contexts (tokens in the cache) and batch sizes a sweep tries, each while it fits on the device.
CONTEXTS: tuple[int, ...] = (512, 2048, 8192, 32768)
BATCHES: tuple[int, ...] = (1, 8, 64)


class PresetError(ValueError):
    """A preset cannot be profiled as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class Sweep:
    """What ``--preset`` measures: ``config`` (bfloat16, fast numerics, max_seq_len covering the contexts)
    decoded at every context and batch, for ``steps`` timed decode steps each."""

    name: str
    config: ModelConfig
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    steps: int = 8


def preset_config(name: str, device: str, *, max_seq_len: int | None = None) -> ModelConfig:
    """The configuration of a preset on ``device``; raises :class:`PresetError` for an unknown name."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    longest = max(CONTEXTS) + 64 if max_seq_len is None else max_seq_len
    return ModelConfig(**PRESETS[name], max_seq_len=longest, max_batch_size=max(BATCHES),  # type: ignore[arg-type]
                       dtype=torch.bfloat16, numerics="fast", device=device)


def weight_bytes(config: ModelConfig) -> int:
    """Bytes of the weights a decode step reads (embedding rows are gathered, not read: left out)."""
    c = config
    per_layer = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model
    per_layer += 3 * c.d_model * c.d_ff + 2 * c.d_model
    return (c.n_layers * per_layer + c.vocab_size * c.d_model + c.d_model) * c.dtype.itemsize


def sweep_for(name: str, device: torch.device, *, quick: bool = False) -> Sweep:
    """The sweep of a preset on ``device``; :class:`PresetError` on a CPU (a preset is a GPU's work: 1b reads 1.6 GB
    of bfloat16 weights every token, 8b 15 GB; the CPU's own figures come from ``--quick`` and the bench
    shape). ``quick``: two contexts and two batch sizes."""
    if device.type != "cuda":
        size = weight_bytes(preset_config(name, "cpu")) / 2**30 if name in PRESETS else 0.0
        raise PresetError(
            f"--preset {name} profiles a real model size ({size:.1f} GiB of bfloat16 weights) and needs a GPU "
            f"(--device cuda); asked for {device}. On a CPU, run `kvverify profile --quick` (the bench shape) or "
            "the benchmarks in profiles/."
        )
    contexts, batches = ((512, 8192), (1, 8)) if quick else (CONTEXTS, BATCHES)
    return Sweep(name, preset_config(name, str(device), max_seq_len=max(contexts) + 64), contexts, batches)
