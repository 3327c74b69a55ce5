"""Helpers shared by the built-in caches."""

from __future__ import annotations

from typing import Any

import torch


def check_layer_order(layer_idx: int, known_layers: int) -> None:
    """Layers are first written in order 0, 1, 2...; anything else is a caller bug worth naming."""
    if not 0 <= layer_idx <= known_layers:
        raise IndexError(f"update() for layer {layer_idx} before layer {known_layers} was ever written")


def new_positions(cache_kwargs: dict[str, Any] | None, length: int, count: int, device: torch.device) -> torch.Tensor:
    """Slots for ``count`` new tokens: ``cache_kwargs['cache_position']`` when given, else after ``length``."""
    position: torch.Tensor | None = (cache_kwargs or {}).get("cache_position")
    if position is None:
        return torch.arange(length, length + count, device=device)
    if position.dtype != torch.long or position.device != device:
        position = position.to(device=device, dtype=torch.long)
    if position.dim() != 1:
        position = position.reshape(-1)
    return position if position.shape[0] == count else position[-count:]
