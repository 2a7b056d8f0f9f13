"""GGUF blocks -> integer values and per-group scales: w = q * scale + zero, exactly as gguf-py dequantizes.

Every integer ggml type is an affine map of small integers per group of values along a row: the type's table
below says which integers, which group, where its scale and zero come from. `decode` returns those pieces for a
rank's rows of blocks; the device op table then packs them into its kernel's layout (quant_ops.py pack_groups).
The common types (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: `_FIELDS`) have their integers read from the block's bit
fields, as gguf-py's dequantize_blocks reads them, and only their scales and zeros checked finite; q * scale + zero
is then gguf-py's float32 value by construction (the same product and sum), which the tests check bit for bit on
random blocks. For the other types the integers are recovered from gguf-py's own dequantized values,
q = round((w - zero) / scale), and checked: q * scale + zero must give back gguf-py's float32 value bit for bit, or
the load fails naming the type. (Decoding through gguf-py took 0.9 of the default model's 2 s load on 2 cores.)

| type    | q (int8 range)         | group | scale (float32)            | zero (float32)     | from the block (ggml-common.h) |
|---------|------------------------|-------|----------------------------|--------------------|--------------------------------|
| Q4_0    | nibble - 8: [-8, 7]    | 32    | d                          | -                  | fp16 d, 16 B nibbles           |
| Q4_1    | nibble: [0, 15]        | 32    | d                          | m                  | fp16 d, m                      |
| Q5_0    | 5 bits - 16: [-16, 15] | 32    | d                          | -                  | fp16 d, 32-bit high bits       |
| Q5_1    | 5 bits: [0, 31]        | 32    | d                          | m                  | fp16 d, m                      |
| Q8_0    | int8: [-128, 127]      | 32    | d                          | -                  | fp16 d                         |
| Q2_K    | 2 bits: [0, 3]         | 16    | d * (sc & 15)              | -dmin * (sc >> 4)  | per 256: fp16 d, dmin          |
| Q3_K    | 3 bits - 4: [-4, 3]    | 16    | d * (6-bit sc - 32)        | -                  | per 256: fp16 d                |
| Q4_K    | nibble: [0, 15]        | 32    | d * (6-bit sc)             | -dmin * (6-bit m)  | per 256: fp16 d, dmin          |
| Q5_K    | 5 bits: [0, 31]        | 32    | d * (6-bit sc)             | -dmin * (6-bit m)  | per 256: fp16 d, dmin          |
| Q6_K    | 6 bits - 32: [-32, 31] | 16    | d * (int8 sc)              | -                  | per 256: fp16 d                |
| IQ4_NL  | codebook: [-127, 113]  | 32    | d                          | -                  | fp16 d, kvalues_iq4nl          |
| IQ4_XS  | codebook: [-127, 113]  | 32    | d * (6-bit ls - 32)        | -                  | per 256: fp16 d                |
| TQ1_0   | ternary: [-1, 1]       | 256   | d                          | -                  | fp16 d (base-3 packed)         |
| TQ2_0   | ternary: [-1, 1]       | 256   | d                          | -                  | fp16 d                         |
| MXFP4   | 2 x e2m1: [-12, 12]    | 32    | 2^(e - 128) (E8M0, halved) | -                  | u8 e                           |
| NVFP4   | 2 x e2m1: [-12, 12]    | 16    | ue4m3 / 2                  | -                  | u8 ue4m3 per 16                |

Not in the table (F32/F16/BF16 and the grid types IQ1_S, IQ1_M, IQ2_*, IQ3_*, whose values are lattice points
times a non-integer scale): `decode` returns None and the layer keeps gguf-py's dequantized floats.

Exactness: q * scale + zero is evaluated as gguf-py does (one product, one sum, in float32), so `decode` is exact.
What a kernel layout rounds beyond that (a zero folded with 8 * scale for an int4 layout, scales in bf16 on the
CPU kernel, an offset -zero / scale on the NPU) is stated where the layout is made, in the op tables.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

T = GGMLQuantizationType
QK_K = 256


@dataclass
class Groups:
    """w [..., N, K] = q * scale + zero, scale and zero constant over each group of `group` values along K."""

    q: np.ndarray  # int8 [..., N, K]
    scale: np.ndarray  # float32 [..., N, K / group]
    zero: np.ndarray | None  # float32 [..., N, K / group], None where the type has none
    group: int

    def dequantize(self) -> np.ndarray:
        s = np.repeat(self.scale, self.group, axis=-1)
        w = self.q.astype(np.float32) * s
        return w if self.zero is None else w + np.repeat(self.zero, self.group, axis=-1)

    def regroup(self, group: int) -> Groups:
        """The same values with scales repeated over finer groups (group divides self.group): exact."""
        if group == self.group:
            return self
        r = self.group // group
        zero = None if self.zero is None else np.repeat(self.zero, r, axis=-1)
        return Groups(self.q, np.repeat(self.scale, r, axis=-1), zero, group)

    def with_zero(self) -> Groups:
        return self if self.zero is not None else Groups(self.q, self.scale, np.zeros_like(self.scale), self.group)


def _f16(b: np.ndarray) -> np.ndarray:
    """[R, 2] little-endian fp16 bytes -> [R, 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _d_m(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q3k_scales(b: np.ndarray) -> np.ndarray:
    """Q3_K's 16 6-bit scales from 12 bytes at offset 96 (gguf-py Q3_K.dequantize_blocks) -> [R, 16] float32."""
    R = b.shape[0]
    raw = b[:, 96:108]
    lo, hi = raw[:, :8], raw[:, 8:]
    lo = (lo.reshape(R, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(R, 16)
    hi = (hi.reshape(R, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(R, 16)
    sc = (lo & 0x0F) | ((hi & 0x03) << 4)
    return (sc.astype(np.int8) - np.int8(32)).astype(np.float32)


def _iq4xs_scales(b: np.ndarray) -> np.ndarray:
    """IQ4_XS's 8 6-bit scales (ls - 32) -> [R, 8] float32 (gguf-py IQ4_XS.dequantize_blocks)."""
    R = b.shape[0]
    sh = np.ascontiguousarray(b[:, 2:4]).view(np.uint16)  # [R, 1]
    sl = b[:, 4:8]
    sl = (sl.reshape(R, -1, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(R, -1) & 0x0F
    sh = (sh.reshape(R, 1, -1) >> np.array([2 * i for i in range(8)], dtype=np.uint16).reshape(1, -1, 1))
    sh = sh.reshape(R, -1).astype(np.uint8) & 0x03
    return ((sl | (sh << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 (subnormal below e = 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


def _ue4m3_half(x: np.ndarray) -> np.ndarray:
    from gguf.quants import NVFP4

    return NVFP4.ue4m3_to_fp32(x).astype(np.float32)


def _scales(qtype: GGMLQuantizationType, b: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """Per-block scale [R, B / g] and zero (or None) and the group g of one type's blocks b [R, type_size]."""
    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0, T.IQ4_NL):
        return _f16(b[:, 0:2]), None, 32
    if qtype in (T.Q4_1, T.Q5_1):
        d, m = _d_m(b)
        return d, m, 32
    if qtype == T.Q2_K:  # scales[16] qs[64] d dmin
        d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
        sc = b[:, :16]
        return d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32)), 16
    if qtype == T.Q3_K:  # hmask[32] qs[64] scales[12] d
        return _f16(b[:, 108:110]) * _q3k_scales(b), None, 16
    if qtype in (T.Q4_K, T.Q5_K):  # d dmin scales[12] ...
        d, dmin = _d_m(b)
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
        return d * sc.astype(np.float32), -(dmin * m.astype(np.float32)), 32
    if qtype == T.Q6_K:  # ql[128] qh[64] scales[16] d
        return _f16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32), None, 16
    if qtype == T.IQ4_XS:  # d scales_h[2] scales_l[4] qs[128]
        return _f16(b[:, 0:2]) * _iq4xs_scales(b), None, 32
    if qtype == T.TQ1_0:
        return _f16(b[:, -2:]), None, QK_K
    if qtype == T.TQ2_0:
        return _f16(b[:, 64:66]), None, QK_K
    if qtype == T.MXFP4:
        return _e8m0_half(b[:, 0:1]), None, 32
    if qtype == T.NVFP4:
        return _ue4m3_half(b[:, 0:4]), None, 16
    return None


def _nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """[R, n] bytes -> [R, 2n] values 0..15: each run of `chunk` bytes gives its low nibbles, then its high ones."""
    R = qs.shape[0]
    v = qs.reshape(R, -1, 1, chunk) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (v & np.uint8(0x0F)).reshape(R, -1)


def _q6k_values(b: np.ndarray) -> np.ndarray:
    """Q6_K's 256 6-bit values - 32 (ql[128] qh[64], gguf-py Q6_K.dequantize_blocks) -> [R, 256] int8."""
    R = b.shape[0]
    ql = _nibbles(b[:, :128], 64).reshape(R, -1, 32)
    qh = b[:, 128:192].reshape(R, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(R, -1, 32)
    return ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(R, -1)


# the integers of a type's blocks [R, type_size] -> [R, block] int8, read from the bit fields (ggml-common.h)
_FIELDS = {
    T.Q4_0: lambda b: (_nibbles(b[:, 2:], 16).astype(np.int8) - np.int8(8)),
    T.Q4_1: lambda b: _nibbles(b[:, 4:], 16).astype(np.int8),
    T.Q8_0: lambda b: np.ascontiguousarray(b[:, 2:]).view(np.int8),  # a copy: not a view of the checkpoint
    T.Q4_K: lambda b: _nibbles(b[:, 16:], 32).astype(np.int8),
    T.Q6_K: _q6k_values,
}


@functools.cache
def decodable(qtype: GGMLQuantizationType) -> bool:
    """Whether `qtype` is in the table (an affine map of integers per group)."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    return qtype not in (T.F32, T.F16, T.BF16) and _scales(qtype, np.zeros((1, type_size), np.uint8)) is not None


CHUNK_BLOCKS = 1 << 14  # blocks decoded at a time: bounds the float32 temporaries (~16 MiB at 256 values a block)


def decode(qtype: GGMLQuantizationType, blocks: np.ndarray) -> Groups | None:
    """Rows of blocks [..., K / block * type_size] uint8 -> Groups with q [..., K], or None for types outside
    the table. Raises ValueError when the integers do not give back gguf-py's values exactly (a corrupt scale)."""
    if not decodable(qtype):
        return None
    type_size = GGML_QUANT_SIZES[qtype][1]
    lead = blocks.shape[:-1]
    flat = blocks.reshape(-1, type_size)  # [R, type_size], R blocks (a view of a C-contiguous read)
    parts = [_decode_blocks(qtype, flat[i : i + CHUNK_BLOCKS], i) for i in range(0, flat.shape[0], CHUNK_BLOCKS)]
    q = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    scale = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    zero = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    group = parts[0][3]
    zero_out = None if zero is None else zero.reshape(*lead, -1)
    return Groups(q=q.reshape(*lead, -1), scale=scale.reshape(*lead, -1), zero=zero_out, group=group)


def _decode_blocks(
    qtype: GGMLQuantizationType, blocks: np.ndarray, first: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Blocks [R, type_size] (the first is block `first` of the tensor) -> q [R, block], scale, zero, group."""
    b = np.ascontiguousarray(blocks)
    found = _scales(qtype, b)
    scale, zero, group = found  # [R, block / group] each
    if qtype in _FIELDS:
        for name, t in (("scale", scale), ("zero", zero)):
            if t is not None and not np.isfinite(t).all():
                r = np.argwhere(~np.isfinite(t))[0]
                raise ValueError(f"{qtype.name}: block {first + r[0]} has {name} {t[tuple(r)]!r} (a corrupt scale)")
        return _FIELDS[qtype](b), scale, zero, group
    # gguf-py's own per-type decoder over all blocks at once (its `dequantize` loops over rows)
    w = getattr(gguf.quants, qtype.name).dequantize_blocks(b)
    w = w.reshape(b.shape[0], -1, group)  # [R, block/g, g] float32, gguf-py's values
    if not np.isfinite(w).all():
        r = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"{qtype.name}: block {first + r[0]} decodes to {w[tuple(r)]!r} (a corrupt scale)")
    s, z = scale[..., None], None if zero is None else zero[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((w if z is None else w - z) / s)
    q = np.where(s == 0, 0, q)  # a zero scale: every value is the zero (or 0)
    if q.size and not (-128 <= q.min() and q.max() <= 127):
        raise ValueError(f"{qtype.name}: integer values beyond int8 ({q.min():.0f}..{q.max():.0f}): a corrupt scale")
    q = q.astype(np.int8)
    back = q.astype(np.float32) * s
    if z is not None:
        back = back + z
    bad = back != w
    if bad.any():
        r = np.argwhere(bad)[0]
        raise ValueError(
            f"{qtype.name}: block {first + r[0]} value {r[1] * group + r[2]} is {w[tuple(r)]!r}, which q * scale + zero "
            f"gives as {back[tuple(r)]!r}: not an affine map of integers (a corrupt block?)"
        )
    return q.reshape(b.shape[0], -1), scale, zero, group
