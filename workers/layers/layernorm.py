"""RMSNorm through the device op table, optionally fused with the residual add, with the bias anti-outlier files add."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.workers.device.base import TorchOps
from shardserve.workers.loader.source import CheckpointSource


class RMSNorm(nn.Module):
    """RMSNorm(x) * weight (+ bias: ModelSlim's anti-outlier m4 writes `<norm>.bias`, the shift it moved out of the
    next Linear; formats-modelslim.md "Anti-outlier")."""

    def __init__(self, name: str, size: int, eps: float, ops: TorchOps, dtype: torch.dtype):
        super().__init__()
        self.name, self.size, self.eps, self.ops, self.dtype = name, size, eps, ops, dtype
        self.register_buffer("weight", None, persistent=False)  # [size], a buffer so .to() moves it
        self.register_buffer("bias", None, persistent=False)  # [size] where the checkpoint has one

    def load(self, source: CheckpointSource) -> None:
        self.weight = source.read(self.name, expect_shape=(self.size,)).to(self.dtype)
        bias = self.name.removesuffix(".weight") + ".bias"
        if bias != self.name and source.has(bias):
            self.bias = source.read(bias, expect_shape=(self.size,)).to(self.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            y = self.ops.rms_norm(x, self.weight, self.eps)
            return y if self.bias is None else y + self.bias
        y, residual = self.ops.add_rms_norm(x, residual, self.weight, self.eps)
        return (y if self.bias is None else y + self.bias), residual
