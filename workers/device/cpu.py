"""The CPU backend: plain torch ops, ATen's CPU int4 weight kernel (opt-in), gloo collectives."""

from __future__ import annotations

import torch

from shardserve.workers.device.base import DeviceBackend, TorchOps

# ATen's CPU int4 kernels (torch >= 2.5): weight [N, K] in a blocked nibble layout, activations and
# scales/zeros in one dtype; _weight_int4pack_mm_cpu checks N % 16 == 0, G in {32, 64, 128, 256} and K % G == 0.
# Only its bf16 variant is vectorized (fp32 and fp16 run a scalar loop, ~30x slower than bf16 here).
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_KERNEL_GROUPS = (32, 64, 128, 256)


class CpuOps(TorchOps):
    """TorchOps, with ATen's bf16 int4 weight-only matmul when `int4_kernel` is asked for and torch has it.

    Opt-in because it rounds: activations, scales and zeros to bf16 and each output to bf16 (fp32 accumulation
    inside). On SmolLM2 Q4_1 that moves fp32 logits by a mean KL of ~3e-4 against the dequantized weights.
    """

    def __init__(self, int4_kernel: bool = False):
        self.int4_kernel = int4_kernel and _HAS_INT4_KERNEL

    def pack_int4(self, q: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel layout: ATen's packed [N, K/2] uint8 and bf16 scales_zeros (8 significant bits of fp16 d's 11)."""
        if not self._fits(scales_zeros, q.shape[1] // scales_zeros.shape[0]):
            return super().pack_int4(q, scales_zeros)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        return packed, scales_zeros.to(torch.bfloat16).contiguous()

    def unpack_int4(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
        if not self._fits(scales_zeros, group_size):
            return super().unpack_int4(packed, scales_zeros, group_size)
        # exact: with scale 1 and zero 8 the kernel returns q itself, and identity rows pick out each k
        K, N = scales_zeros.shape[0] * group_size, scales_zeros.shape[1]
        ones = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(K // group_size, N, 2).contiguous()
        eye = torch.eye(K, dtype=torch.bfloat16)
        q_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, ones)  # [K, N]
        return q_t.T.to(torch.uint8)

    def int4_group_matmul(
        self, x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor
    ) -> torch.Tensor:
        if not self._fits(scales_zeros, group_size):
            return super().int4_group_matmul(x, packed, group_size, scales_zeros)
        xb = x.to(torch.bfloat16).contiguous()  # [T, K]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_zeros).to(x.dtype)

    def _fits(self, scales_zeros: torch.Tensor, group_size: int) -> bool:
        """Whether the kernel takes this [K/G, N, 2] weight: pack, unpack and matmul ask alike, so agree on layout."""
        return self.int4_kernel and group_size in _KERNEL_GROUPS and scales_zeros.shape[1] % 16 == 0


def backend(int4_kernel: bool = False) -> DeviceBackend:
    return DeviceBackend(name="cpu", dist_backend="gloo", ray_resource="CPU", ops=CpuOps(int4_kernel))


def available() -> bool:
    return True
