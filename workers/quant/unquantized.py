"""Unquantized (bf16/fp16/fp32) safetensors weights: the plain matmul, and the grouped one for MoE experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from shardserve.workers.quant.base import LinearMethod, MoEMethod, MoESpec, MoEWhich, QuantConfig, register

if TYPE_CHECKING:
    from shardserve.workers.device.base import TorchOps


class UnquantizedLinearMethod(LinearMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight)  # [T, K] @ [N, K].T

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight


class UnquantizedMoEMethod(MoEMethod):
    """Float experts, read per expert (`experts.{e}.gate_proj.weight`, ...) and stacked at load."""

    expert_method = UnquantizedLinearMethod()

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        # keep the [E, N, K] shape over [E, K, N] storage: the layout grouped_mm reads fastest
        layer.weight = layer.weight.transpose(1, 2).contiguous().transpose(1, 2)  # [E_local, N, K]

    def apply(
        self, layer: nn.Module, x: torch.Tensor, group_counts: torch.Tensor, ops: TorchOps
    ) -> torch.Tensor:
        return ops.grouped_matmul(x, layer.weight, group_counts)  # [M, K] x [E, N, K] -> [M, N]

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

    def moe_method(self, prefix: str, which: MoEWhich) -> MoEMethod:
        return UnquantizedMoEMethod()
