"""Unquantized (bf16/fp16/fp32) safetensors weights: the plain matmul."""

from __future__ import annotations

import torch
from shardserve.workers.quant.base import LinearMethod, QuantConfig, register
from torch import nn


class UnquantizedLinearMethod(LinearMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight)  # [T, K] @ [N, K].T

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight


@register
class Unquantized(QuantConfig):
    name = "unquantized"

    @classmethod
    def detect(cls, model_path: str) -> Unquantized | None:
        return cls()

    def linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()
