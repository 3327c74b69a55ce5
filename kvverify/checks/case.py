"""One test case: a model configuration, the weights' seed, a (left-padded) prompt and a generation length."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel


@dataclass(frozen=True)
class Case:
    """prompt: one list of token ids per row, all the same length, left-padded with ``pad[row]`` leading
    positions that the attention mask hides (their token ids are kept but ignored)."""

    config: ModelConfig
    prompt: tuple[tuple[int, ...], ...]
    pad: tuple[int, ...]
    max_new_tokens: int
    seed: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def batch(self) -> int:
        return len(self.prompt)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt[0])

    @property
    def total_len(self) -> int:
        """Tokens the cache holds once generation ends (the last token is chosen but never fed)."""
        return self.prompt_len + self.max_new_tokens - 1

    def tokens(self) -> torch.Tensor:
        """(B, T) long."""
        return torch.tensor(self.prompt, dtype=torch.long, device=self.config.device)

    def attention_mask(self) -> torch.Tensor:
        """(B, T) long: 0 for left padding, 1 for tokens."""
        device = self.config.device
        positions = torch.arange(self.prompt_len, device=device)
        return (positions[None, :] >= torch.tensor(self.pad, device=device)[:, None]).long()

    def model(self) -> ReferenceModel:
        return build_model(self.config, self.seed)

    def describe(self) -> str:
        """A readable summary: the non-default config fields, the prompt and the length."""
        c = self.config
        fields = ", ".join(
            f"{name}={getattr(c, name)!r}"
            for name in (
                "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                "norm", "positional", "sliding_window", "max_seq_len", "max_batch_size",
            )
        )
        fields += f", dtype={str(c.dtype).removeprefix('torch.')!r}, numerics={c.numerics!r}"
        fields += f", device={c.device!r}" if c.device != "cpu" else ""
        lines = [
            f"config: ModelConfig({fields})",
            f"weights seed: {self.seed}",
            f"prompt: batch {self.batch} x {self.prompt_len} tokens, left padding per row {list(self.pad)}",
            f"max_new_tokens: {self.max_new_tokens} (the cache ends holding {self.total_len} tokens)",
        ]
        return "\n".join(lines)


@functools.lru_cache(maxsize=32)
def build_model(config: ModelConfig, seed: int) -> ReferenceModel:
    """A reference model, memoised (the last 32 used): strategies revisit the same small shapes often."""
    return ReferenceModel(config, seed=seed)
