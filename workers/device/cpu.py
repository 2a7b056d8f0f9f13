"""The CPU backend: plain torch ops, ATen's CPU int4 weight kernel for group-quantized weights and int8 GEMM for
W8A8-style schemes, gloo collectives."""

from __future__ import annotations

import torch

from shardserve.workers.device.base import DeviceBackend, TorchOps
from shardserve.workers.device.quant_ops import GroupWeight, _dequantize_groups

# ATen's CPU int4 kernels (torch >= 2.5): weight [N, K] in a blocked nibble layout, activations and
# scales/zeros in one dtype; _weight_int4pack_mm_cpu checks N % 16 == 0, G in {32, 64, 128, 256} and K % G == 0.
# Only its bf16 variant is vectorized (fp32 and fp16 run a scalar loop, ~30x slower than bf16 here).
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_KERNEL_GROUPS = (32, 64, 128, 256)


class CpuOps(TorchOps):
    """TorchOps, with ATen's bf16 int4 weight-only matmul for group-quantized (GGUF) weights where it fits.

    Layouts pack_groups makes (the kernel computes w = (u - 8) * s + z per group, u in 0..15):
    - "int4pack": values spanning 16 integers (Q4_0, Q4_1, Q4_K, TQ*): u = q + 8 with z = zero where q fits
      [-8, 7] (Q4_0, TQ*), else u = q - lo with z = zero + (lo + 8) * scale (Q4_1, Q4_K).
    - "int4pack2": int8 values (Q5_*, Q8_0, IQ4_*, MXFP4) as two int4 weights, q = 16 hi + lo_nibble:
      hi + 8 with scale 16 * scale and zero + 8 * scale, and lo_nibble with scale alone; y is the sum of two
      kernel calls.
    - the reference "groups" layout (dequantized at each call) where the kernel does not fit: groups of 16
      (Q2_K, Q3_K, Q6_K, NVFP4), N % 16 != 0, stacked MoE experts, embedding lookups.
    The kernel rounds activations, scales and zeros to bf16 (8 significant bits; fp16 d has 11) and each output
    to bf16, accumulating in fp32: on SmolLM2 Q4_1 that moves fp32 logits by a mean KL of ~3e-4 against the
    dequantized weights, within the HF-vs-llama.cpp noise floor (tests/workers/quant/test_gguf_groups.py).
    """

    def pack_groups(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, lookup: bool = False
    ) -> GroupWeight:
        N, K = q.shape[-2:]
        if lookup or q.dim() != 2 or not _HAS_INT4_KERNEL or group not in _KERNEL_GROUPS or N % 16 or K % group:
            return super().pack_groups(q, scale, zero, group, lookup)
        z = torch.zeros_like(scale) if zero is None else zero.float()
        s = scale.float()
        lo, hi = int(q.min()), int(q.max())
        if hi - lo < 16:
            # u = q + shift: centred (shift 8, the zero untouched) where q fits [-8, 7], so that small values
            # (TQ's -1..1) are not the difference of two large bf16-rounded terms; else u = q - lo
            shift = 8 if -8 <= lo and hi <= 7 else -lo
            sz = _scales_zeros(s, z if shift == 8 else z + (8 - shift) * s)
            return GroupWeight("int4pack", (N, K), group, bits=4, lo=lo, packed=_pack(q, shift), sz=sz)
        # int8 q = 16 hi + 8 + (low - 8): hi = q >> 4 (arithmetic shift: floor) in [-8, 7], low = q & 15. The
        # zero and the 8 go with hi, so the second call's part (low - 8) * scale is small and centred: the two
        # bf16-rounded outputs then do not cancel (with the zero on low, Q5_K's parts did, 40x the error)
        return GroupWeight(
            "int4pack2", (N, K), group, bits=8,
            hi=_pack(q >> 4, 8), sz_hi=_scales_zeros(16 * s, z + 8 * s),
            lo4=_pack(q & 15, 0), sz_lo=_scales_zeros(s, torch.zeros_like(s)),
        )

    def _int_sums(self, x_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """int8 x int8 -> int32 through ATen's CPU int8 GEMM (exact for K < 2^17), which takes any shape; int4 values
        held in int8 (W4A4, W4A8) go the same way."""
        if x_q.dtype == torch.int8 and w.dtype == torch.int8:
            return torch._int_mm(x_q.contiguous(), w.t())  # [M, K] @ [K, N]
        return super()._int_sums(x_q, w)

    def group_matmul(self, x: torch.Tensor, w: GroupWeight) -> torch.Tensor:
        if w.layout == "int4pack":
            return _kernel(x, w.packed, w.group, w.sz).to(x.dtype)
        if w.layout == "int4pack2":
            return (_kernel(x, w.hi, w.group, w.sz_hi).float() + _kernel(x, w.lo4, w.group, w.sz_lo).float()).to(x.dtype)
        return super().group_matmul(x, w)

    def group_dequantize(self, w: GroupWeight) -> torch.Tensor:
        """What the kernel multiplies by: the bf16 scales and zeros applied to the exact values."""
        if w.layout == "int4pack":
            return _dequantize_int4(_unpack(w.packed, w.sz, w.group), w.sz, w.group)
        if w.layout == "int4pack2":
            high = _dequantize_int4(_unpack(w.hi, w.sz_hi, w.group), w.sz_hi, w.group)
            return high + _dequantize_int4(_unpack(w.lo4, w.sz_lo, w.group), w.sz_lo, w.group)
        return super().group_dequantize(w)


_PACK_ROWS = 1024  # rows converted at a time (the layout tiles N by 64, so whole chunks concatenate exactly)


def _pack(q: torch.Tensor, shift: int) -> torch.Tensor:
    """[N, K] int8 values, q + shift in 0..15 -> ATen's CPU int4 layout [N, K/2] uint8 (it takes int32: a large
    matrix, a vocabulary, is converted 1024 rows at a time to bound that copy)."""
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    if q.shape[0] % _PACK_ROWS or q.shape[0] == _PACK_ROWS:
        return convert(q.to(torch.int32).add_(shift), 1)
    return torch.cat([convert(c.to(torch.int32).add_(shift), 1) for c in q.split(_PACK_ROWS)])


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale, zero [N, K/G] float32 -> the kernel's [K/G, N, 2] bf16."""
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def _kernel(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, group, sz)  # [T, N]


def _unpack(packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The kernel's u [N, K] back, exactly: with scale 1 and zero 8 it returns u itself, and identity rows pick
    out each k."""
    G, N = sz.shape[0], sz.shape[1]
    K = G * group
    ones = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(G, N, 2).contiguous()
    u_t = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), packed, group, ones)  # [K, N]
    return u_t.T.float()


def _dequantize_int4(u: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """u [N, K] in 0..15, sz [K/G, N, 2] -> (u - 8) * scale + zero, float32 [N, K]."""
    scale, zero = sz.float().permute(2, 1, 0)  # [N, K/G] each
    return _dequantize_groups(u - 8, scale, zero, group)


def backend() -> DeviceBackend:
    return DeviceBackend(name="cpu", dist_backend="gloo", ray_resource="CPU", ops=CpuOps())


def available() -> bool:
    return True
