"""The CPU's group-quantized weight kernel (kernels/gq.c): built for this machine on first use, packed, called.

ATen's CPU int4 kernel (cpu.py's fallback) takes 4-bit values with bf16 scales only and rounds activations and
outputs to bf16. gq.c takes 4-, 5-, 6- and 8-bit values with their exact scales (float16 where GGUF's are, else
float32), so a Q5_0 or Q6_K layer is held at its own width, one copy serves a tied embedding and head, and stacked
MoE experts multiply in place. It sums integer products (AVX2's madd_epi16) over activations held as int16 per 32
values, 15 bits of each chunk's largest value: a product differs from a float32 matmul of gguf-py's values by about
1e-5 of |x| @ |w|.T (gq.c's header). At batch 1 it runs at about ATen's speed here. cpu_native.py builds it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import weakref

import torch

from shardserve.workers.device import cpu_native
from shardserve.workers.device.cpu_native import I64, INT, P
from shardserve.workers.device.quant_ops import GroupWeight, narrowest_exact

_SCALE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Weight(ctypes.Structure):
    """gq.c's gq_weight."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("nib", "hb", "q8", "scale", "zero")] + [
        ("N", ctypes.c_int64), ("K", ctypes.c_int64)
    ] + [(name, ctypes.c_int) for name in ("bits", "group", "lo", "sdtype")]


_W = ctypes.POINTER(_Weight)
_SIGNATURES = {
    "gq_matmul": [P, I64, P, _W, INT],
    "gq_grouped_matmul": [P, I64, P, P, I64, _W, INT],
    "gq_rows": [P, I64, P, _W, INT],
}


@functools.cache
def library(flags: tuple[str, ...] = cpu_native.FLAGS) -> ctypes.CDLL | None:
    """cpu_native's library with gq.c's functions declared, or None where it does not build."""
    lib = cpu_native.library(flags)
    if lib is not None:
        cpu_native.declare(lib, _SIGNATURES)
    return lib


def simd(lib: ctypes.CDLL) -> int:
    """The vector width gq.c's products were built for: 512 (AVX2 + FMA, AVX-512 BW/DQ for batch 1's row pairs),
    256 (AVX2 + FMA) or 0 (portable C)."""
    lib.gq_simd.restype = ctypes.c_int
    return lib.gq_simd()


def width(lo: int, hi: int) -> int:
    """Bits held per value for integers spanning lo..hi: 4, 5 or 6 (as u = q - lo), else 8 (q itself, int8)."""
    span = hi - lo
    return next((b for b in (4, 5, 6) if span < 1 << b), 8)


def fits(q: torch.Tensor, group: int) -> bool:
    K = q.shape[-1]
    return K % 32 == 0 and (group == 16 or group % 32 == 0) and K % group == 0


_PACK_ROWS = 4096  # rows packed at a time, so that the temporaries stay a chunk's size (a vocabulary is large)


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> GroupWeight:
    """q int8 [..., N, K], scale/zero float32 [..., N, K/group] -> the "gq" layout (gq.c's header)."""
    shape, K = tuple(q.shape), q.shape[-1]
    lo, hi = int(q.min()), int(q.max())
    bits = width(lo, hi)
    tensors = {"scale": narrowest_exact(scale).contiguous()}
    if zero is not None:
        tensors["zero"] = narrowest_exact(zero).to(tensors["scale"].dtype).contiguous()
        tensors["scale"] = tensors["scale"].to(tensors["zero"].dtype)  # one dtype for both (the kernel's sdtype)
    if bits == 8:
        return GroupWeight("gq", shape, group, bits=8, q8=q.to(torch.int8).contiguous(), **tensors)
    rows = q.reshape(-1, K)
    nib = torch.empty(rows.shape[0], K // 2, dtype=torch.uint8)
    hb = torch.empty(rows.shape[0], K // 8 * (bits - 4), dtype=torch.uint8)
    for start in range(0, rows.shape[0], _PACK_ROWS):
        part = slice(start, start + _PACK_ROWS)
        nib[part], hb[part] = _pack_rows(rows[part], lo, bits)
    tensors["nib"] = nib.view(*shape[:-1], K // 2)
    if bits > 4:
        tensors["hb"] = hb.view(*shape[:-1], -1)
    return GroupWeight("gq", shape, group, bits=bits, lo=lo, **tensors)


_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)


def _pack_rows(q: torch.Tensor, lo: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, K] int8 -> nib [R, K/2] and hb [R, K/8 * (bits - 4)] (gq.c's header), u = q - lo."""
    R, K = q.shape
    u = (q.to(torch.int16) - lo).to(torch.uint8).view(R, K // 32, 2, 16)
    nib = ((u[..., 0, :] & 15) | ((u[..., 1, :] & 15) << 4)).view(R, K // 2)
    planes = [((u >> (4 + p)) & 1).view(R, K // 32, 4, 8) for p in range(bits - 4)]  # bit j of word: value j
    words = [(plane * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8) for plane in planes]  # [R, K/32, 4] bytes each
    hb = torch.stack(words, dim=-2).view(R, -1) if words else torch.empty(R, 0, dtype=torch.uint8)  # [R, K/32, P, 4]
    return nib, hb


def weight_struct(w: GroupWeight) -> ctypes.Structure:
    """w's gq_weight, made once, and again only when its buffers were replaced (a `.to()`): the cache holds a weak
    reference to the scale tensor it was made from, so it keeps no replaced tensor alive."""
    held = w.__dict__.get("_gq_struct")
    if held is not None and held[1]() is w._buffers["scale"]:
        return held[0]
    ptr = lambda name: None if getattr(w, name, None) is None else getattr(w, name).data_ptr()  # noqa: E731
    N, K = w.shape[-2:]
    struct = _Weight(ptr("nib"), ptr("hb"), ptr("q8"), ptr("scale"), ptr("zero"), N, K, w.bits, w.group, w.lo,
                     _SCALE_DTYPES[w.scale.dtype])
    w.__dict__["_gq_struct"] = (struct, weakref.ref(w._buffers["scale"]))  # plain state beside the buffers
    return struct


def _on_cpu(*tensors: torch.Tensor) -> None:
    """The C kernel reads host memory: anything else (a model moved to meta or another device) is refused, not read."""
    elsewhere = [str(t.device) for t in tensors if t.device.type != "cpu"]
    if elsewhere:
        raise ValueError(f"gq weights multiply on the CPU only; found tensors on {', '.join(sorted(set(elsewhere)))}")


def matmul(x: torch.Tensor, w: GroupWeight) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] @ W^T."""
    _on_cpu(x, w.scale)
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], w.shape[-2], dtype=torch.float32)
    library().gq_matmul(x.data_ptr(), x.shape[0], y.data_ptr(), weight_struct(w), torch.get_num_threads())
    return y


def grouped_matmul(x: torch.Tensor, w: GroupWeight, group_counts: torch.Tensor) -> torch.Tensor:
    """Rows of expert e of x [M, K] (sorted by expert) times expert e of w [E, N, K] -> float32 [M, N] (rows past
    the groups zero)."""
    _on_cpu(x, w.scale)
    x = x.float().contiguous()
    counts = group_counts.to(torch.int64).contiguous()
    y = torch.zeros(x.shape[0], w.shape[-2], dtype=torch.float32)
    lib, ref = library(), weight_struct(w)
    lib.gq_grouped_matmul(x.data_ptr(), x.shape[0], y.data_ptr(), counts.data_ptr(), counts.numel(), ref, torch.get_num_threads())
    return y


def rows(w: GroupWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids [T] of w [N, K] -> float32 [T, K], gguf-py's values bit for bit."""
    _on_cpu(ids, w.scale)
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), w.shape[-1], dtype=torch.float32)
    library().gq_rows(ids.data_ptr(), ids.numel(), out.data_ptr(), weight_struct(w), torch.get_num_threads())
    return out


def dequantize(w: GroupWeight) -> torch.Tensor:
    """The effective weight float32 [..., N, K]: stacked experts row by row as one [E * N, K] matrix."""
    flat = GroupWeight("gq", (math.prod(w.shape[:-1]), w.shape[-1]), w.group, w.bits, w.lo)
    for name, t in w.named_buffers():
        flat.register_buffer(name, t, persistent=False)
    return rows(flat, torch.arange(flat.shape[0])).view(*w.shape)
