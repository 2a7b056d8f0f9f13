"""Rotary position embedding: cos/sin tables for default, linear and llama3 frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inv_frequencies(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))  # [R/2]
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default", "none"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3(inv, scaling)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """transformers' _compute_llama3_parameters: long wavelengths slowed by `factor`, smooth in between."""
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        rotary_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None,
        freq_factors: torch.Tensor | None = None,
    ):
        super().__init__()
        inv = inv_frequencies(rotary_dim, theta, scaling)
        if freq_factors is not None:  # llama.cpp's rope_freqs tensor (llama3 GGUFs): freq / factor
            inv = inv / freq_factors.double()
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv)  # [P, R/2]
        self.register_buffer("cos", freqs.cos().float(), persistent=False)  # buffers: .to() moves them
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # [T, R/2] each
