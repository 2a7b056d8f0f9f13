"""Quantized matmuls of the device op table: plain-torch references (the test oracle) that device tables override.

Compute rules follow the ModelSlim page (/work/shared/formats-modelslim.md): W8A8 static, W8A8_DYNAMIC,
W4A4_DYNAMIC, W8A16/W4A16 (per channel or per group) and W8A8_MXFP8. A weight enters as the checkpoint's
[N, K] (`nn.Linear` layout, N out, K in) and goes through `prepare_weight` once, after loading; the matmuls take
what `prepare_weight` returned, so a device may keep its own layout (the NPU transposes and packs int4).
Likewise `dynamic_quant(bits=4)` returns this table's container: pass it only to this table's `quant_matmul`.
The grouped matmuls (MoE experts, rows sorted by expert as TorchOps.grouped_matmul takes them) read the stacked
weight [E, N, K] as loaded, not through `prepare_weight`; no table overrides them yet, so the NPU runs these
plain-torch references too.
"""

from __future__ import annotations

from typing import Literal

import torch

WeightKind = Literal["int8", "int4", "fp8"]

MX_BLOCK = 32  # elements sharing one E8M0 exponent along K (OCP MX)
FP8_E4M3_EMAX = 8  # floor(log2(448)): MX scale = 2^(floor(log2 amax) - emax)
FP8_E4M3_MAX = 448.0


class QuantOps:
    """Mixin of an op table. Weights are symmetric (zero offsets folded or absent) except in weight_quant_matmul."""

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
        qmax = {8: 127, 4: 7}[bits]
        xf = x.float()
        scale = xf.abs().amax(dim=-1) / qmax  # [M]
        q = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
        return q.clamp(-qmax - 1, qmax).to(torch.int8), scale

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
        return _int_matmul_scaled(x_q, w, scale, pertoken_scale, bias).to(out_dtype)

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
            out[rows] = _int_matmul_scaled(x_q[rows], w[e], scale[e], tok, None if bias is None else bias[e])
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


def _int_matmul_scaled(
    x_q: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    pertoken_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """(x_q [M, K] @ w [N, K]^T + bias [N]) * scale [N] * pertoken_scale [M] -> float32 [M, N]. The integer sums
    are accumulated in float64, exact (|sum| < 2^53) where int32 matmul has no kernel (CUDA)."""
    acc = x_q.double() @ w.double().T  # [M, N], integer-valued
    if bias is not None:
        acc = acc + bias.double()
    y = acc.float() * scale.float()
    return y if pertoken_scale is None else y * pertoken_scale.float().unsqueeze(-1)


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
