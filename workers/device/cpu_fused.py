"""The CPU table's fused decode ops (kernels/fused.c): RMSNorm with its residual add, rotary, one-query attention
over the paged cache. Each returns None where it does not apply (no built library, a dtype other than float32),
and the caller then runs torch's ops (base.py TorchOps)."""

from __future__ import annotations

import ctypes
import functools

import torch

from shardserve.workers.device import cpu_native
from shardserve.workers.device.cpu_native import FLOAT, I64, INT, P

_SIGNATURES = {
    "fused_add_rms_norm": [P, P, P, P, FLOAT, I64, I64, P],
    "fused_rotary": [P, I64, I64, I64, I64, P, P, I64],
    "fused_decode_attention": [P, P, P, P, I64, P, I64, I64, I64, I64, I64, FLOAT, I64, P, INT],
}


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = cpu_native.library()
    if lib is not None:
        cpu_native.declare(lib, _SIGNATURES)
    return lib


def _fp32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(RMSNorm(x + residual) * weight, x + residual), or (RMSNorm(x) * weight, None) without a residual."""
    lib = library()
    if lib is None or not _fp32(x, weight, *([] if residual is None else [residual])):
        return None
    x, H = x.contiguous(), x.shape[-1]
    out = torch.empty_like(x)
    summed = None if residual is None else torch.empty_like(x)
    res = None if residual is None else residual.contiguous()
    lib.fused_add_rms_norm(
        x.data_ptr(), None if res is None else res.data_ptr(), None if summed is None else summed.data_ptr(),
        weight.contiguous().data_ptr(), eps, x.numel() // H, H, out.data_ptr(),
    )
    return out, summed


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, heads, D] rotated (a new tensor) over its first 2 * cos.shape[-1] dims; cos/sin [T, R/2]."""
    lib = library()
    if lib is None or not _fp32(x, cos, sin):
        return None
    out = x.contiguous().clone() if x.is_contiguous() else x.contiguous()
    T, heads, D = out.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    lib.fused_rotary(out.data_ptr(), T, heads, D, heads * D, cos.data_ptr(), sin.data_ptr(), cos.shape[-1])
    return out


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, window: int | None,
) -> torch.Tensor | None:
    """One query per sequence: q [B, H, D] over its cached keys (GQA, optional sliding window) -> [B, H, D]."""
    lib = library()
    if lib is None or not _fp32(q, k_cache, v_cache) or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    q = q.contiguous()
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    tables, lens = block_tables.to(torch.int64).contiguous(), context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    lib.fused_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
        B, H, Hkv, D, block_size, scale, window or 0, out.data_ptr(), torch.get_num_threads(),
    )
    return out
