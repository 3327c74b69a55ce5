"""Model configuration: one frozen dataclass, validated on construction, with named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

Norm = Literal["rms", "layer"]
Positional = Literal["rope", "learned", "alibi", "none"]
Numerics = Literal["strict", "fast"]

NORMS: tuple[str, ...] = ("rms", "layer")
POSITIONALS: tuple[str, ...] = ("rope", "learned", "alibi", "none")
NUMERICS: tuple[str, ...] = ("strict", "fast")
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

PRESETS: dict[str, dict[str, Any]] = {
    # A model small enough to write its keys down, big enough to have GQA and two layers.
    "tiny": dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128),
    # The shape of transformers' LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
    # num_key_value_heads=2, vocab_size=1024, intermediate_size=688), for side-by-side benchmarks.
    "bench": dict(
        vocab_size=1024, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688,
        max_seq_len=4096, max_batch_size=8, numerics="fast",
    ),
}


class ConfigError(ValueError):
    """A ModelConfig field broke one of its rules; the message names the field, the rule and the value."""


def _got(value: object) -> str:
    """What came, with its type: ``'32' (str)``."""
    return f"{value!r} ({type(value).__name__})"


def _require(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ConfigError(f"ModelConfig.{field} must be {rule}; got {_got(value)}.")


def _is_int(value: object) -> bool:
    """An int that is not a bool (True is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_dtype(value: object) -> torch.dtype:
    expected = f"a floating torch.dtype or its name, one of {sorted(DTYPES)}"
    if isinstance(value, torch.dtype):
        _require(value in DTYPES.values(), "dtype", expected + " (the reference model computes in floating point)",
                 value)
        return value
    _require(isinstance(value, str) and value.removeprefix("torch.") in DTYPES, "dtype", expected, value)
    return DTYPES[str(value).removeprefix("torch.")]


def device_name(value: object) -> str | None:
    """The one normalisation of a device: the name (``cpu``, ``cuda``, ``cuda:0``) of the device ``value`` names,
    a str or a torch.device; None when it names none. Each caller raises its own error for None."""
    if isinstance(value, torch.device):
        return str(value)
    if not isinstance(value, str):
        return None
    try:
        return str(torch.device(value))
    except (RuntimeError, ValueError):
        return None


def _as_device(value: object) -> str:
    name = device_name(value)
    if name is None:
        raise ConfigError(
            f"ModelConfig.device must be a torch device name such as 'cpu', 'cuda' or 'cuda:0' (a str or a "
            f"torch.device); got {_got(value)}."
        )
    return name


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``n_kv_heads`` left at 0 means ``n_heads`` (multi-head attention); fewer gives grouped-query attention
    and 1 gives multi-query attention. ``head_dim`` left at 0 means ``d_model // n_heads`` and ``d_ff`` left
    at 0 means ``4 * d_model``. With ``sliding_window=W`` each query sees itself and the ``W - 1`` tokens before it.
    ``numerics="strict"`` makes every reduction independent of how many rows are computed at once, so cached
    and uncached logits are bitwise identical; ``"fast"`` uses the standard kernels.
    """

    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: derived, n_heads
    head_dim: int = 0  # 0: derived, d_model // n_heads
    d_ff: int = 0  # 0: derived, 4 * d_model
    norm: Norm = "rms"
    positional: Positional = "rope"
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_seq_len: int = 128
    max_batch_size: int = 8
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    numerics: Numerics = "strict"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "dtype", _as_dtype(self.dtype))
        set_(self, "device", _as_device(self.device))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, "a positive int", value)
        for name in ("n_kv_heads", "head_dim", "d_ff"):  # 0 (or None): derived below
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 0), name, "a positive int, or 0 to derive it",
                     value)
        if self.n_kv_heads in (0, None):
            set_(self, "n_kv_heads", self.n_heads)
        if self.head_dim in (0, None):
            _require(self.d_model % self.n_heads == 0, "head_dim",
                     f"given explicitly when d_model ({self.d_model}) is not a multiple of n_heads", self.n_heads)
            set_(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff in (0, None):
            set_(self, "d_ff", 4 * self.d_model)
        _require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                 f"a divisor of n_heads={self.n_heads} (1 for MQA, n_heads for MHA)", self.n_kv_heads)
        for name, allowed in (("norm", NORMS), ("positional", POSITIONALS), ("numerics", NUMERICS)):
            value = getattr(self, name)
            _require(isinstance(value, str) and value in allowed, name, f"one of {allowed}", value)
        if self.positional == "rope":
            _require(self.head_dim % 2 == 0, "head_dim", "even when positional='rope'", self.head_dim)
        _require(_is_real(self.rope_theta) and self.rope_theta > 0, "rope_theta", "a positive, finite number",
                 self.rope_theta)
        _require(_is_real(self.norm_eps) and self.norm_eps > 0, "norm_eps", "a positive, finite number",
                 self.norm_eps)
        if self.sliding_window is not None:
            _require(_is_int(self.sliding_window) and self.sliding_window >= 1,
                     "sliding_window", "None or an int >= 1 (the query plus W-1 tokens before it)",
                     self.sliding_window)

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named shape (``"tiny"``, ``"bench"``) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})
