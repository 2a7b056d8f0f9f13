"""Quantized matmuls of the device op table: plain-torch references (the test oracle) that device tables override.

Compute rules follow the ModelSlim page (/work/shared/formats-modelslim.md): W8A8 static, W8A8_DYNAMIC,
W4A4_DYNAMIC, W8A16/W4A16 (per channel or per group) and W8A8_MXFP8. A weight enters as the checkpoint's
[N, K] (`nn.Linear` layout, N out, K in) and goes through `prepare_weight` once, after loading; the matmuls take
what `prepare_weight` returned, so a device may keep its own layout (the NPU transposes and packs int4).
Likewise `dynamic_quant(bits=4)` returns this table's container: pass it only to this table's `quant_matmul`.
The grouped matmuls (MoE experts, rows sorted by expert as TorchOps.grouped_matmul takes them) read the stacked
weight [E, N, K] as loaded, not through `prepare_weight`; the NPU overrides grouped_dynamic_quant_matmul (A8W8
through npu_grouped_matmul) and runs the other grouped references as they are.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

WeightKind = Literal["int8", "int4", "fp8"]

MX_BLOCK = 32  # elements sharing one E8M0 exponent along K (OCP MX)
FP8_E4M3_EMAX = 8  # floor(log2(448)): MX scale = 2^(floor(log2 amax) - emax)
FP8_E4M3_MAX = 448.0


class GroupWeight(nn.Module):
    """A group-quantized weight w [..., N, K] = q * scale + zero (per group of `group` values along K) in the layout
    one op table's `pack_groups` chose; only that table's group_* ops read it. A module so that `.to()` moves its
    tensors (buffers) with the layer that holds it.

    Layout "groups" (the plain-torch reference, every table's fallback): q int8 [..., N, K], or two values a byte
    [..., N, K/2] uint8 stored as q - lo when the values span at most 16 integers (`bits` 4); scale and zero
    [..., N, K/group] (zero absent when the format has none) in float16, bfloat16 or float32, whichever is the
    narrowest to hold them exactly (`narrowest_exact`). Exact: it holds the checkpoint's values.
    """

    def __init__(self, layout: str, shape: tuple[int, ...], group: int, bits: int = 8, lo: int = 0, **tensors):
        super().__init__()
        self.layout, self.shape, self.group, self.bits, self.lo = layout, tuple(shape), group, bits, lo
        for name, value in tensors.items():
            self.register_buffer(name, value, persistent=False)

    def extra_repr(self) -> str:
        return f"{self.layout}, shape={self.shape}, group={self.group}, bits={self.bits}"


class QuantOps:
    """Mixin of an op table. Weights are symmetric (zero offsets folded or absent) except in weight_quant_matmul."""

    # ---- group-quantized weights (GGUF): w = q * scale + zero per group along K ---------------------------------
    def pack_groups(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, lookup: bool = False
    ) -> GroupWeight:
        """Once after loading: q int8 [..., N, K], scale/zero float32 [..., N, K/group] -> this table's layout.
        `lookup`: the weight is an embedding whose rows group_rows gathers, exactly (the reference layout, or a
        table's own that it reads exactly); tie_groups then makes it multipliable for a tied head.
        The reference keeps the values exactly (layout "groups", 4-bit packed where they span 16 integers)."""
        return pack_reference_groups(q, scale, zero, group)

    def group_matmul(self, x: torch.Tensor, w: GroupWeight) -> torch.Tensor:
        """y [T, N] = x [T, K] @ w.T in x.dtype, w [N, K] from pack_groups."""
        return F.linear(x.float(), self.group_dequantize(w)).to(x.dtype)

    def grouped_group_matmul(self, x: torch.Tensor, w: GroupWeight, group_counts: torch.Tensor) -> torch.Tensor:
        """Rows of expert e of x [M, K] (sorted by expert) times w[e] of the stacked w [E, N, K] -> [M, N]; the
        experts are dequantized into x.dtype, then one grouped_matmul of this table (rows past the groups
        unspecified, as there)."""
        return self.grouped_matmul(x, self.group_dequantize(w).to(x.dtype), group_counts)

    def group_dequantize(self, w: GroupWeight) -> torch.Tensor:
        """The effective weight float32 [..., N, K] of any layout this table packs (the test oracle's input)."""
        if w.layout != "groups":
            raise ValueError(f"{type(self).__name__} cannot read a {w.layout!r} GroupWeight (packed by another table)")
        return _dequantize_groups(_reference_q(w), w.scale, getattr(w, "zero", None), w.group)

    def tie_groups(self, w: GroupWeight) -> GroupWeight:
        """A lookup weight that a tied LM head multiplies too: w itself where this table's group_matmul reads
        it (one copy of the values), else the head's own copy in this table's kernel layout."""
        packed = self.pack_groups(*unpack_reference_groups(w), lookup=False)
        return w if packed.layout == w.layout else packed

    def group_rows(self, w: GroupWeight, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of a lookup weight [N, K] (pack_groups(lookup=True)) -> float32 [T, K], exactly its values."""
        zero = getattr(w, "zero", None)
        q = w.q.index_select(0, ids)
        if w.bits == 4:
            q = _unpack_nibbles(q, w.lo)
        return _dequantize_groups(q, w.scale.index_select(0, ids), None if zero is None else zero.index_select(0, ids), w.group)

    def prepare_weight(self, w: torch.Tensor, kind: WeightKind) -> torch.Tensor:
        """Once after loading. w [N, K]: int8 (kind "int8"), int8 holding int4 values in [-8, 7] ("int4"),
        or float8_e4m3fn ("fp8"). The reference keeps [N, K]."""
        return w

    def prepare_mx_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Once after loading. scale [N, ceil(K/32)] uint8 E8M0 (value 2^(s - 127)). The reference keeps it."""
        return scale

    def static_quant(self, x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
        """W8A8 per-tensor asymmetric: x [M, K] float, input_scale/input_offset [1] -> int8 [M, K]
        = clamp(round(x / input_scale + input_offset), -128, 127)."""
        q = torch.round(x.float() / input_scale.float() + input_offset.float())
        return q.clamp(-128, 127).to(torch.int8)

    def dynamic_quant(self, x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token symmetric: x [M, K] -> (x_q, scale [M] float32), scale = max|x[m]| / qmax (127 or 7),
        x_q = clamp(round(x / scale), -qmax-1, qmax). The reference x_q is int8 [M, K] for both widths."""
        return dynamic_quant_reference(x, bits)

    def dynamic_group_quant_matmul(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bits: int, group: int
    ) -> torch.Tensor:
        """Per-token int`bits` activations times an integer weight w [N, K] (as loaded, not prepared) with one scale
        per group of `group` along K, scale [N, ceil(K/group)]: y = s_x * sum_g scale[n, g] * (x_q w^T over g), in
        x.dtype. Float32 sums of integer products, exact below 2^24 per group."""
        x_q, s_x = dynamic_quant_reference(x, bits)
        K = w.shape[-1]
        deq = w.float() * scale.float().repeat_interleave(group, dim=-1)[:, :K]  # [N, K]
        return ((x_q.float() @ deq.T) * s_x.unsqueeze(-1)).to(x.dtype)

    def grouped_dynamic_quant_matmul(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        group_counts: torch.Tensor,
        bits: int = 8,
        group: int = 0,
    ) -> torch.Tensor:
        """W8A8_DYNAMIC / W4A8 / W4A4 experts: rows of expert e of x [M, K] (sorted by expert) quantized per token to
        int`bits`, times w[e] of w [E, N, K] int8 (as loaded), scale [E, N] per channel or [E, N, G] per group of
        `group` -> [M, N] in x.dtype; rows past sum(group_counts) are unspecified (zeros here; the NPU's grouped
        kernel leaves them as they fall)."""
        x_q, s_x = dynamic_quant_reference(x, bits)
        out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)  # [M, N]
        start = 0
        for e, count in enumerate(group_counts.tolist()):
            rows = slice(start, start + count)
            if group:
                deq = w[e].float() * scale[e].float().repeat_interleave(group, dim=-1)[:, : w.shape[-1]]  # [N, K]
                out[rows] = (x_q[rows].float() @ deq.T) * s_x[rows].unsqueeze(-1)
            else:
                out[rows] = self._int_matmul_scaled(x_q[rows], w[e], scale[e], s_x[rows], None)
            start += count
        return out.to(x.dtype)

    def fp8_dynamic_matmul(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """WFP8AFP8_DYNAMIC: x [M, K] quantized per token to float8_e4m3fn (s = max|x[m]| / 448, x_q = fp8(x / s)),
        w float8_e4m3fn [N, K] as loaded, scale [N]: y = (x_q w^T) s scale, in x.dtype. No table overrides it yet."""
        xf = x.float()
        s = xf.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / FP8_E4M3_MAX  # [M]
        x_q = (xf / s.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        y = x_q.float() @ w.float().T  # [M, N]
        return (y * s.unsqueeze(-1) * scale.float()).to(x.dtype)

    def quant_matmul(
        self,
        x_q: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        pertoken_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """y [M, N] = (x_q @ w^T + bias) * scale * pertoken_scale, accumulated in int32.

        x_q: from static_quant or dynamic_quant; w: from prepare_weight ("int8" or "int4");
        scale [N] float32: deq_scale (W8A8 static) or weight_scale (dynamic);
        pertoken_scale [M] float32 from dynamic_quant, None for static; bias [N] int32: ModelSlim quant_bias.
        """
        return self._int_matmul_scaled(x_q, w, scale, pertoken_scale, bias).to(out_dtype)

    def _int_matmul_scaled(
        self,
        x_q: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        pertoken_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """(x_q [M, K] @ w [N, K]^T + bias [N]) * scale [N] * pertoken_scale [M] -> float32 [M, N]. The integer sums
        are accumulated in float64 here, exact (|sum| < 2^53); the CPU table uses ATen's int8 GEMM (int32, exact)."""
        acc = self._int_sums(x_q, w)  # [M, N], integer-valued
        if bias is not None:
            acc = acc + bias.to(acc.dtype)
        y = acc.float() * scale.float()
        return y if pertoken_scale is None else y * pertoken_scale.float().unsqueeze(-1)

    def _int_sums(self, x_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x_q.double() @ w.double().T

    def weight_quant_matmul(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> torch.Tensor:
        """W8A16/W4A16: y [M, N] = x @ ((w - offset) * scale)^T in x.dtype (ModelSlim's sign of the offset).

        x [M, K] float; w from prepare_weight ("int8" or "int4"); scale/offset in x.dtype, [N] per channel or
        [N, ceil(K/g)] per group of g = group_size along K.
        """
        wf = w.float()  # [N, K]
        s, o = scale.float(), None if offset is None else offset.float()
        if group_size:
            s = s.repeat_interleave(group_size, dim=1)[:, : wf.shape[1]]
            o = None if o is None else o.repeat_interleave(group_size, dim=1)[:, : wf.shape[1]]
        else:
            s, o = s.reshape(-1, 1), None if o is None else o.reshape(-1, 1)
        deq = (wf - o if o is not None else wf) * s  # [N, K]
        return (x.float() @ deq.T).to(x.dtype)

    def grouped_quant_matmul(
        self,
        x_q: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        group_counts: torch.Tensor,
        pertoken_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """quant_matmul per expert: rows of group e of x_q [M, K] (sorted by group) times w[e] of w [E, N, K] int8,
        scale [E, N], pertoken_scale [M], bias [E, N] int32 -> [M, N]; rows past sum(group_counts) are zeros."""
        out = torch.zeros(x_q.shape[0], w.shape[1], dtype=torch.float32, device=x_q.device)  # [M, N]
        start = 0
        for e, count in enumerate(group_counts.tolist()):
            rows = slice(start, start + count)
            tok = None if pertoken_scale is None else pertoken_scale[rows]
            out[rows] = self._int_matmul_scaled(x_q[rows], w[e], scale[e], tok, None if bias is None else bias[e])
            start += count
        return out.to(out_dtype)

    def grouped_weight_quant_matmul(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        group_counts: torch.Tensor,
        offset: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> torch.Tensor:
        """weight_quant_matmul per expert: x [M, K] float sorted by group, w [E, N, K] int8 (int4 values in int8
        too), scale/offset [E, N] per channel or [E, N, ceil(K/g)] per group -> [M, N] in x.dtype. The experts
        are dequantized into x.dtype, then one grouped matmul of this table."""
        K = w.shape[-1]
        s, o = scale.float(), None if offset is None else offset.float()
        if group_size:
            s = s.repeat_interleave(group_size, dim=-1)[..., :K]  # [E, N, K]
            o = None if o is None else o.repeat_interleave(group_size, dim=-1)[..., :K]
        else:
            s, o = s.reshape(*s.shape[:2], 1), None if o is None else o.reshape(*o.shape[:2], 1)
        deq = (w.float() - o if o is not None else w.float()) * s  # [E, N, K]
        return self.grouped_matmul(x, deq.to(x.dtype), group_counts)

    def mx_quant_matmul(self, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        """W8A8_MXFP8: x [M, K] float quantized per 32-block along K (e = floor(log2 amax) - 8, x_q = fp8(x / 2^e));
        w float8_e4m3fn and w_scale (E8M0 uint8 [N, ceil(K/32)]) from prepare_weight / prepare_mx_scale.
        y [M, N] = sum over blocks of (x_q 2^e) (w 2^(s-127))^T, in x.dtype."""
        x_q, x_exp = mx_quantize(x)  # [M, K] fp8, [M, Kb] int
        xd = mx_dequantize(x_q, x_exp)
        wd = mx_dequantize(w, w_scale.to(torch.int32) - 127)
        return (xd @ wd.T).to(x.dtype)

    def mxfp4_quant_matmul(self, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_bits: int) -> torch.Tensor:
        """W4A4_MXFP4 (act_bits 4) / W4A8_MXFP (8): w uint8 [N, K/2], two FP4 E2M1 values a byte along K (element 2i
        in the low nibble: sign << 3 | index into 0, .5, 1, 1.5, 2, 3, 4, 6), w_scale uint8 E8M0 [N, ceil(K/32)];
        x quantized per 32-block along K to MXFP4 (msmodelslim's rule, `mxfp4_act_dequantize`) or MXFP8
        (`mx_quantize`). y [M, N] = x_q w^T in x.dtype. Emulated in float32 on every table: no MX units here, and
        no torch_npu FP4 op is wired (Ascend 950's npu_dynamic_mx_quant rounds by its own rule)."""
        K = x.shape[-1]
        wd = mx_dequantize(fp4_unpack(w)[:, :K], w_scale.to(torch.int32) - 127)
        xd = mxfp4_act_dequantize(x) if act_bits == 4 else mx_dequantize(*mx_quantize(x))
        return (xd @ wd.T).to(x.dtype)


def dynamic_quant_reference(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantOps.dynamic_quant's rule in plain torch: (int8 x_q [M, K], scale [M] float32)."""
    qmax = {8: 127, 4: 7}[bits]
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / qmax  # [M]
    q = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return q.clamp(-qmax - 1, qmax).to(torch.int8), scale


def pack_reference_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> GroupWeight:
    """The "groups" layout: values spanning at most 16 integers two a byte (even k in the low nibble), scales and
    zeros in the narrowest float type that holds them exactly."""
    lo, hi = int(q.min()), int(q.max())
    tensors = {"scale": narrowest_exact(scale).contiguous()}
    if zero is not None:
        tensors["zero"] = narrowest_exact(zero).contiguous()
    if hi - lo < 16 and q.shape[-1] % 2 == 0:
        u = (q.to(torch.int16) - lo).to(torch.uint8)
        packed = u[..., 0::2] | (u[..., 1::2] << 4)
        return GroupWeight("groups", tuple(q.shape), group, bits=4, lo=lo, q=packed.contiguous(), **tensors)
    return GroupWeight("groups", tuple(q.shape), group, q=q.to(torch.int8).contiguous(), **tensors)


def narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """t (float32 values) in float16 or bfloat16 where every value survives the round trip (GGUF's fp16 d and m
    do: Q4_0, Q4_1, Q5_0, Q8_0), else float32. Readers widen with .float(), so the values they see are t's."""
    for dtype in (torch.float16, torch.bfloat16):
        narrow = t.to(dtype)
        if torch.equal(narrow.float(), t.float()):
            return narrow
    return t.float()


def unpack_reference_groups(w: GroupWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """The "groups" layout's exact pieces back: (q int8, scale, zero or None, group), to repack for a kernel."""
    if w.layout != "groups":
        raise ValueError(f"only the reference 'groups' layout can be unpacked, not {w.layout!r}")
    return _reference_q(w).to(torch.int8), w.scale, getattr(w, "zero", None), w.group


def _unpack_nibbles(packed: torch.Tensor, lo: int) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] int16 values (+ lo)."""
    u = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
    return u.to(torch.int16) + lo


def _reference_q(w: GroupWeight) -> torch.Tensor:
    return _unpack_nibbles(w.q, w.lo) if w.bits == 4 else w.q


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """q [..., K] integers, scale/zero [..., K/group] -> float32 q * scale + zero (gguf-py's order of operations)."""
    shape = q.shape
    w = q.float()  # one [..., K] float32 allocation, scaled and shifted in place
    groups = w.view(*shape[:-1], -1, group)
    groups.mul_(scale.float().unsqueeze(-1))
    if zero is not None:
        groups.add_(zero.float().unsqueeze(-1))
    return w


def affine_to_offset(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q * scale + zero as weight_quant_matmul's (q - offset) * scale: offset = -zero / scale (one float32 division:
    |d(offset * scale)| <= 2^-24 |zero|). A group whose scale is 0 holds `zero` alone: its values become 0, its
    scale `zero` and its offset -1, which is exact. Returns (q, scale, offset) with offset None without zeros."""
    if zero is None:
        return q, scale, None
    dead = scale == 0  # [..., G]
    group = q.shape[-1] // scale.shape[-1]
    if dead.any():
        q = q.masked_fill(dead.repeat_interleave(group, dim=-1), 0)
    offset = torch.where(dead, torch.full_like(zero, -1.0), -zero / torch.where(dead, torch.ones_like(scale), scale))
    return q, torch.where(dead, zero, scale), offset


def mx_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX (scale_alg 0): x [M, K] -> (float8_e4m3fn [M, K], shared exponents [M, ceil(K/32)] int32 in [-127, 127])."""
    M, K = x.shape
    Kb = -(-K // MX_BLOCK)
    xb = torch.nn.functional.pad(x.float(), (0, Kb * MX_BLOCK - K)).view(M, Kb, MX_BLOCK)
    amax = xb.abs().amax(dim=-1)  # [M, Kb]
    exp = torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - FP8_E4M3_EMAX
    exp = torch.where(amax == 0, torch.full_like(exp, -127.0), exp).clamp(-127, 127)
    q = (xb / torch.exp2(exp).unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.view(M, Kb * MX_BLOCK)[:, :K].to(torch.float8_e4m3fn), exp.to(torch.int32)


def mx_dequantize(q: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """q [R, K] fp8, exp [R, ceil(K/32)] unbiased exponents -> float32 [R, K]."""
    K = q.shape[1]
    scale = torch.exp2(exp.float()).repeat_interleave(MX_BLOCK, dim=1)[:, :K]
    return q.float() * scale


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 E2M1 magnitudes by 3-bit index (OCP MX)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[R, K/2] uint8 -> float32 [R, K]: element 2i from the low nibble, 2i+1 from the high one, each sign << 3 | idx."""
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).long()  # [R, K]
    magnitude = torch.tensor(E2M1, device=packed.device)[nibbles & 7]
    return torch.where(nibbles >= 8, -magnitude, magnitude)


def mxfp4_act_dequantize(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] through MXFP4 per 32-block along K and back to float32, by msmodelslim's fake-quant rule
    (ir/api/impl/mx_quantization.py calculate_mxfp4_qparam, mxfp4_quantize): shared exponent
    e = floor(log2(amax * 8/7 + 9.6e-7)) - 2; per element p = clip(floor(log2(|x| / 2^e + 9.6e-7)), 0, 2), the
    mantissa rounded half away from zero to one bit, magnitudes clipped to 6."""
    M, K = x.shape
    Kb = -(-K // MX_BLOCK)
    xb = torch.nn.functional.pad(x.float(), (0, Kb * MX_BLOCK - K)).view(M, Kb, MX_BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)  # [M, Kb, 1]
    e = (torch.floor(torch.log2(amax / 0.875 + 9.6e-7)) - 2).clamp(-129, 125)
    biased = xb.abs() / torch.exp2(e)
    p = torch.floor(torch.log2(biased + 9.6e-7)).clamp(0, 2)
    value = (torch.floor(biased / torch.exp2(p) * 2 + 0.5) / 2 * torch.exp2(p)).clamp(max=6.0)
    value = torch.where(e < -127, torch.zeros_like(value), value)
    return (torch.sign(xb) * value * torch.exp2(e)).view(M, Kb * MX_BLOCK)[:, :K]
