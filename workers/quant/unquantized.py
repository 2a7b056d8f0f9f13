"""Unquantized (bf16/fp16/fp32) safetensors weights: the plain matmul, and the grouped one for MoE experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from shardserve.workers.quant.base import LinearMethod, LinearSpec, MoEMethod, MoESpec, QuantConfig, register

if TYPE_CHECKING:
    from shardserve.workers.device.base import TorchOps


class UnquantizedLinearMethod(LinearMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight, layer.bias)  # [T, K] @ [N, K].T + [N]

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight


class UnquantizedMoEMethod(MoEMethod):
    """Float experts, read per expert (`experts.{e}.gate_proj.weight`, ...) and stacked at load."""

    expert_method = UnquantizedLinearMethod()

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        # keep the [E, N, K] shape over [E, K, N] storage: the layout grouped_mm reads fastest
        layer.weight = layer.weight.transpose(1, 2).contiguous().transpose(1, 2)  # [E_local, N, K]

    def apply(
        self, layer: nn.Module, x: torch.Tensor, group_counts: torch.Tensor, ops: TorchOps, is_prefill: bool
    ) -> torch.Tensor:
        y = ops.grouped_matmul(x, layer.weight, group_counts)  # [M, K] x [E, N, K] -> [M, N]
        return y if layer.bias is None else y + expert_rows(layer.bias, group_counts, y.shape[0])

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight


def expert_rows(per_expert: torch.Tensor, group_counts: torch.Tensor, rows: int) -> torch.Tensor:
    """per_expert [E, N] repeated for each row of its group -> [rows, N]; zeros past the grouped rows."""
    group = torch.repeat_interleave(torch.arange(len(group_counts), device=per_expert.device), group_counts)  # [sum]
    out = per_expert.index_select(0, group)  # [sum(group_counts), N]
    return torch.nn.functional.pad(out, (0, 0, 0, rows - out.shape[0]))


@register
class Unquantized(QuantConfig):
    name = "unquantized"
    _linear = UnquantizedLinearMethod()  # methods are stateless: one instance serves every layer
    _moe = UnquantizedMoEMethod()

    @classmethod
    def detect(cls, model_path: str) -> Unquantized | None:
        return cls()

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        return self._linear

    def moe_method(self, spec: MoESpec) -> MoEMethod:
        return self._moe
