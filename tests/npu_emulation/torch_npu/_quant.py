"""EMULATION (plain torch, CPU) of torch_npu's quantization and quantized-matmul ops, from their documented formulas.

int4 containers: the docs say only "8 int4 per int32" (npu_convert_weight_to_int4pack adds "interleaved"); the
emulation packs element 8i+j into bits [4j, 4j+4) of int32 i. The real nibble order is unknown to us, which is
harmless only because shardserve never packs or unpacks int4 itself: it always goes through these ops.
"""

from __future__ import annotations

import torch

float8_e8m0fnu = torch.float8_e8m0fnu  # torch_npu's own dtype constant; scales travel as uint8 biased exponents
MX_BLOCK = 32


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[.., 8n] integers in [-8, 7] -> int32 [.., n]."""
    if values.shape[-1] % 8:
        raise ValueError(f"int4 packing needs the last dim a multiple of 8, got {values.shape[-1]}")
    if bool((values < -8).any()) or bool((values > 7).any()):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (values.long() & 0xF).view(*values.shape[:-1], -1, 8)
    packed = (nibbles << (4 * torch.arange(8))).sum(dim=-1)  # < 2^32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [.., n] -> int32 [.., 8n] in [-8, 7]."""
    nibbles = (packed.long().unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    return (((nibbles ^ 8) - 8).reshape(*packed.shape[:-1], -1)).to(torch.int32)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """doc: int32 weight (k, n) or (n, k), contiguous, values in [-8, 7] -> int32 (k, n/8) or (n, k/8)."""
    if weight.dtype != torch.int32 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError("npu_convert_weight_to_int4pack takes a contiguous 2-D int32 tensor")
    return _pack_int4(weight)


def npu_dynamic_quant(
    input: torch.Tensor,
    *,
    smooth_scales: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    dst_type: torch.dtype | None = None,
    quant_mode: str = "pertoken",
    dst_type_max: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """doc: scale = rowMax(|x|) / DTYPE_MAX (float32, x's shape without the last dim), y = round(x / scale).
    dst_type None/int8 -> int8; quint4x2 -> int32 with 8 int4 each (last dim / 8)."""
    if smooth_scales is not None or group_index is not None or quant_mode != "pertoken" or dst_type_max:
        raise NotImplementedError("emulated npu_dynamic_quant: plain per-token quantization only")
    if input.dim() < 2:
        raise ValueError("npu_dynamic_quant needs x with more than one dim")
    qmax = {None: 127, torch.int8: 127, torch.quint4x2: 7}[dst_type]
    xf = input.float()
    scale = xf.abs().amax(dim=-1) / qmax
    q = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).clamp(-qmax - 1, qmax)
    return (_pack_int4(q) if qmax == 7 else q.to(torch.int8)), scale


def npu_quantize(
    input: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    dtype: torch.dtype,
    axis: int = 1,
    div_mode: bool = True,
) -> torch.Tensor:
    """doc: div_mode True: input / scales + zero_points; False: input * scales + zero_points (scales/zero_points of
    input's dtype, 1-D of size 1 or input.shape[axis]). Rounded and saturated to dtype (qint8 -> int8)."""
    if not div_mode and (scales.dtype != input.dtype or (zero_points is not None and zero_points.dtype != input.dtype)):
        raise TypeError("div_mode=False: scales and zero_points must have input's dtype")
    axis = axis % input.dim()
    if scales.dim() != 1 or scales.shape[0] not in (1, input.shape[axis]):
        raise ValueError(f"scales must be 1-D of size 1 or {input.shape[axis]}")
    shape = [1] * input.dim()
    shape[axis] = -1
    s = scales.float().view(shape)
    y = input.float() / s if div_mode else input.float() * s
    if zero_points is not None:
        y = y + zero_points.float().view(shape)
    lo, hi, out = {torch.qint8: (-128, 127, torch.int8), torch.quint8: (0, 255, torch.uint8)}[dtype]
    return torch.round(y).clamp(lo, hi).to(out)


def _int4_right(x2: torch.Tensor, K: int) -> torch.Tensor:
    """int32 x2 as (K, N/8) contiguous, or (K/8, N) transposed from a contiguous (N, K/8) -> int32 [K, N]."""
    if x2.shape[0] == K and x2.is_contiguous():
        return _unpack_int4(x2)
    if x2.shape[0] * 8 == K and x2.t().is_contiguous():
        return _unpack_int4(x2.t()).t()
    raise ValueError(f"int32 (int4) x2 must be (K, N/8) contiguous or (K/8, N) transposed; got {tuple(x2.shape)}")


def _mx_exponents(scale: torch.Tensor, blocks: int, along_rows: bool) -> torch.Tensor:
    """E8M0 pairs -> unbiased exponent per 32-block: pertoken [M, Kb/2, 2] -> [M, Kb]; x2's [Kb/2, N, 2] -> [Kb, N]."""
    e = scale.to(torch.int32) - 127
    e = e.reshape(e.shape[0], -1) if along_rows else e.permute(0, 2, 1).reshape(-1, e.shape[1])
    return e[:, :blocks] if along_rows else e[:blocks]


def npu_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    x1_dtype=None,
    x2_dtype=None,
    pertoken_scale_dtype=None,
    scale_dtype=None,
    group_sizes: list[int] | None = None,
    y_scale=None,
) -> torch.Tensor:
    """doc: out = (x1 @ x2 + int32 bias) * scale * pertoken_scale + offset, or x1 @ x2 * scale (* pertoken) + float
    bias. x1 [M, K], x2 [K, N] int8 (any strides), int32 = int4 (x1 (M, K/8); x2 see _int4_right), or float8 with
    E8M0 MX scales (scale_dtype = pertoken_scale_dtype = float8_e8m0fnu, group_sizes [1, 1, 32]: scale
    [ceil(K/64), N, 2], pertoken_scale [M, ceil(K/64), 2]). output_dtype None = int8 (requantised); float32 output
    is not among the documented ones and is rejected."""
    if x1_dtype is not None or x2_dtype is not None or y_scale is not None or x1.dtype != x2.dtype:
        raise NotImplementedError("emulated npu_quant_matmul: x1/x2 of one torch dtype, no x1_dtype/x2_dtype/y_scale")
    if output_dtype not in (None, torch.int8, torch.float16, torch.bfloat16, torch.int32):
        raise TypeError(f"npu_quant_matmul output_dtype {output_dtype} is not supported (int8, float16, bfloat16, int32)")
    if scale.dtype == torch.int64:
        raise NotImplementedError("emulated npu_quant_matmul: int64 (npu_trans_quant_param) scales not modelled")
    if x1.dtype == torch.float8_e4m3fn:
        if scale_dtype != float8_e8m0fnu or pertoken_scale_dtype != float8_e8m0fnu or group_sizes != [1, 1, MX_BLOCK]:
            raise NotImplementedError("emulated npu_quant_matmul: fp8 inputs only as MXFP8 (E8M0 scales, group 32)")
        K = x1.shape[1]
        blocks = -(-K // MX_BLOCK)
        xe = _mx_exponents(pertoken_scale, blocks, along_rows=True).repeat_interleave(MX_BLOCK, dim=1)[:, :K]
        we = _mx_exponents(scale, blocks, along_rows=False).repeat_interleave(MX_BLOCK, dim=0)[:K]
        y = (x1.float() * torch.exp2(xe.float())) @ (x2.float() * torch.exp2(we.float()))
        return (y + bias.float() if bias is not None else y).to(output_dtype or torch.int8)
    if scale_dtype is not None or pertoken_scale_dtype is not None or group_sizes is not None:
        raise NotImplementedError("emulated npu_quant_matmul: scale dtypes / group_sizes only for MXFP8")
    if x1.dtype == torch.int32:
        if not x1.is_contiguous():
            raise ValueError("int4 x1 must be contiguous (M, K/8)")
        left = _unpack_int4(x1)
        right = _int4_right(x2, left.shape[1])
    elif x1.dtype == torch.int8:
        left, right = x1.to(torch.int32), x2.to(torch.int32)
    else:
        raise TypeError(f"npu_quant_matmul x1 must be int8, int32 (int4) or float8, got {x1.dtype}")
    if left.shape[1] != right.shape[0] or scale.dim() != 1 or scale.shape[0] not in (1, right.shape[1]):
        raise ValueError(f"shapes x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}, scale {tuple(scale.shape)} do not fit")
    acc = left @ right  # [M, N] int32
    int_bias = bias is not None and bias.dtype == torch.int32
    if int_bias:
        acc = acc + bias
    if output_dtype == torch.int32:
        return acc
    y = acc.float() * scale.float()
    if pertoken_scale is not None:
        if pertoken_scale.dtype != torch.float32 or pertoken_scale.shape != (x1.shape[0],):
            raise ValueError(f"pertoken_scale must be float32 [M={x1.shape[0]}]")
        y = y * pertoken_scale.unsqueeze(-1)
    if offset is not None:
        y = y + offset.float()
    if bias is not None and not int_bias:
        y = y + bias.float()
    if output_dtype is None or output_dtype == torch.int8:
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y.to(output_dtype)


def npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
    weight_dtype=None,
) -> torch.Tensor:
    """doc: y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias, in x's dtype. x (M, K); weight int8
    (K, N) (transposed views allowed) or int32 = int4 as for npu_quant_matmul's x2. antiquant_scale/offset of x's
    dtype: (1,) per tensor, (N,) or (1, N) per channel, (ceil(K/g), N) per group, g in [32, K-1] a multiple of 32."""
    if quant_scale is not None or quant_offset is not None or weight_dtype is not None:
        raise NotImplementedError("emulated npu_weight_quant_batchmatmul: no output quantization / weight_dtype")
    K = x.shape[1]
    w = _int4_right(weight, K) if weight.dtype == torch.int32 else weight
    if weight.dtype not in (torch.int8, torch.int32) or w.shape[0] != K:
        raise ValueError(f"weight must be int8 (K={K}, N) or int4-in-int32, got {weight.dtype} {tuple(weight.shape)}")
    N = w.shape[1]
    if antiquant_scale.dtype != x.dtype or (antiquant_offset is not None and antiquant_offset.dtype != x.dtype):
        raise TypeError("antiquant_scale/antiquant_offset must have x's dtype")
    if antiquant_offset is not None and antiquant_offset.shape != antiquant_scale.shape:
        raise ValueError("antiquant_offset must have antiquant_scale's shape")
    g = antiquant_group_size
    if g:
        if g % 32 or not 32 <= g <= K - 1 or antiquant_scale.shape != (-(-K // g), N):
            raise ValueError(f"per-group: group size {g} (multiple of 32 in [32, K-1]) and scale (ceil(K/g), N={N})")
        expand = lambda t: t.float().repeat_interleave(g, dim=0)[:K]  # noqa: E731  [K, N]
    else:
        if antiquant_scale.numel() not in (1, N):
            raise ValueError(f"per-channel scale must have 1 or N={N} elements, got {tuple(antiquant_scale.shape)}")
        expand = lambda t: t.float().reshape(1, -1)  # noqa: E731  [1, N] or [1, 1]
    w_f = w.float() + (expand(antiquant_offset) if antiquant_offset is not None else 0.0)
    y = x.float() @ (w_f * expand(antiquant_scale))
    return (y + bias.float() if bias is not None else y).to(x.dtype)


def npu_dynamic_mx_quant(
    input: torch.Tensor,
    *,
    axis: int = -1,
    round_mode: str = "rint",
    dst_type: torch.dtype | int = 296,
    block_size: int = 32,
    scale_alg: int = 0,
    dst_type_max: float = 0.0,
    max_low_bound: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hicann/ops-nn DynamicMxQuant README (OCP, scale_alg 0) along the last axis into float8_e4m3fn:
    shared_exp = floor(log2(max|block|)) - 8 (emax of e4m3; -127 for an all-zero block, clamped to [-127, 127]),
    y = cast(x / 2^shared_exp) with rint and saturation to +-448. mxscale: uint8 biased exponents
    [.., ceil(ceil(K/32) / 2), 2] (pairs along the blocks, an odd last pair padded with 0 = 2^-127)."""
    if axis not in (-1, input.dim() - 1) or round_mode != "rint" or block_size != MX_BLOCK or scale_alg != 0:
        raise NotImplementedError("emulated npu_dynamic_mx_quant: last axis, rint, block 32, scale_alg 0 only")
    if dst_type != torch.float8_e4m3fn or dst_type_max or max_low_bound:
        raise NotImplementedError("emulated npu_dynamic_mx_quant: dst_type float8_e4m3fn only")
    lead, K = input.shape[:-1], input.shape[-1]
    blocks = -(-K // MX_BLOCK)
    xb = torch.nn.functional.pad(input.float(), (0, blocks * MX_BLOCK - K)).reshape(*lead, blocks, MX_BLOCK)
    amax = xb.abs().amax(dim=-1)
    shared = torch.floor(torch.log2(torch.where(amax == 0, torch.ones_like(amax), amax))) - 8
    shared = torch.where(amax == 0, torch.full_like(shared, -127), shared).clamp(-127, 127)
    y = (xb / torch.exp2(shared).unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    biased = torch.nn.functional.pad((shared + 127).to(torch.uint8), (0, blocks % 2))
    return y.reshape(*lead, blocks * MX_BLOCK)[..., :K], biased.reshape(*lead, -1, 2)
