"""ModelSlim's schemes, one method each: what a Linear of that label stores, how it loads, and how it computes.

Compute rules are /work/shared/formats-modelslim.md section 2 (msmodelslim 26.1.0's savers and fake-quant
modules); N = out, K = in of a weight [N, K]. Every matmul goes through the device's op table (quant_ops.py and
its torch_npu counterparts in npu.py), so an Ascend device runs its own kernels and the CPU the references.

| label | tensors per Linear | compute | ops |
|---|---|---|---|
| W8A8 | weight i8, input_scale/offset [1], quant_bias i32 [N], deq_scale [N] (f32, or the f32 bits as i64) | x_q = clamp(round(x / s + o)); y = deq (x_q w^T + quant_bias); the `.bias` is inside quant_bias | static_quant, quant_matmul |
| W8A8_DYNAMIC | weight i8, weight_scale/offset [N, 1] or [N, K/g] | per-token int8 x; y = s_x s_w (x_q w^T) + bias | dynamic_quant, quant_matmul |
| W4A4_DYNAMIC | weight i8 holding int4, weight_scale/offset as above | per-token int4 x (max / 7) | dynamic_quant(bits=4), quant_matmul |
| W4A8_DYNAMIC | weight int4 two a byte along N [N/2, K] (`version` files; legacy: i8 [N, K]), weight_scale [N, 1], scale_bias; two-stage: weight_scale_second/offset_second [N, K/g] | per-token int8 x; W = s1 s2 (w - o2) | as W8A8_DYNAMIC on s2 (w - o2) when it fits int8 |
| W8A8_MIX | W8A8's and W8A8_DYNAMIC's | dynamic in prefill, static in decode | both |
| W8A16 | weight i8, weight_scale/offset [N, 1] or [N, K/g] | x ((w - o) s)^T | weight_quant_matmul |
| WFP8AFP8_DYNAMIC | weight f8e4m3, weight_scale [N, 1] | per-token fp8 x (max / 448) | fp8_dynamic_matmul |
| W8A8_MXFP8 | weight f8e4m3, weight_scale u8 E8M0 [N, K/32] | MXFP8 x per 32 along K | mx_quant_matmul |
| W4A4_MXFP4 / W4A8_MXFP | weight FP4 E2M1 two a byte along K [N, K/2], weight_scale u8 E8M0 [N, K/32] | MXFP4 / MXFP8 x per 32 along K | mxfp4_quant_matmul (emulated) |

`scale_bias` (W4A8) is a correction term the Ascend int4 grouped kernel reads; msmodelslim writes it from the
dequantized weight and never reads it back: our kernels compute without it, so it is read and dropped.
Zero weight offsets are what msmodelslim writes for every activation-quantized scheme (symmetric weights); a
non-zero one there is refused at load rather than computed wrongly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from shardserve.workers.device.quant_ops import fp4_unpack, mx_dequantize
from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.quant.base import LinearMethod, LinearSpec, MoEMethod, MoESpec, TensorSpec, bias_spec
from shardserve.workers.quant.unquantized import expert_rows

if TYPE_CHECKING:
    from shardserve.workers.device.base import TorchOps
    from shardserve.workers.quant.modelslim import ModelSlim

# what each label reads: its weight's kind and how its activations are quantized
WEIGHT_KIND = {
    "W8A8": "int8", "W8A8_DYNAMIC": "int8", "W8A8_MIX": "int8", "W8A16": "int8", "W4A4_DYNAMIC": "int4",
    "W4A8_DYNAMIC": "int4", "WFP8AFP8_DYNAMIC": "fp8", "W8A8_MXFP8": "fp8", "W4A4_MXFP4": "fp4", "W4A8_MXFP": "fp4",
}
MXFP4_ACT_BITS = {"W4A4_MXFP4": 4, "W4A8_MXFP": 8}
ACT_BITS = {"W8A8_DYNAMIC": 8, "W8A8_MIX": 8, "W4A4_DYNAMIC": 4, "W4A8_DYNAMIC": 8}


FP8_SCHEMES = ("WFP8AFP8_DYNAMIC", "W8A8_MXFP8")
MX_SCHEMES = ("W8A8_MXFP8", *MXFP4_ACT_BITS)  # weight_scale: E8M0 per 32 along K
# MoE schemes without a grouped op: expert by expert through the Linear ops, each expert's tensors prepared apart
LOOPED = ("W8A8", "W8A8_MIX", "WFP8AFP8_DYNAMIC", *MX_SCHEMES)


class ModelSlimLinearMethod(LinearMethod):
    """One label's Linear. Stateless per layer: the tensors' shapes (per channel or per group, packed or not) come
    from the checkpoint through the format (`fmt.shape`)."""

    def __init__(self, fmt: ModelSlim, scheme: str):
        self.fmt, self.scheme = fmt, scheme

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        s, first, k = self.scheme, spec.sub_prefixes[0], spec.input_size
        scale_shape = self.fmt.shape(f"{first}.weight_scale")
        per_group = s not in (*FP8_SCHEMES, *MX_SCHEMES) and scale_shape is not None and len(scale_shape) == 2 and scale_shape[1] > 1
        group = -(-k // scale_shape[1]) if per_group else 1

        def scales(*names: str, optional: bool = False) -> list[TensorSpec]:
            dims = ("N", "K") if per_group else ("N", 1)
            return [TensorSpec(n, dims, in_pack=group, dtype=torch.float32, optional=optional) for n in names]

        if s in MX_SCHEMES:  # FP4 packed two a byte along K (pack_fp4_to_uint8)
            packed_k = 2 if s in MXFP4_ACT_BITS else 1
            return [TensorSpec("weight", in_pack=packed_k), TensorSpec("weight_scale", ("N", "K"), in_pack=32),
                    bias_spec(spec)]
        packed = 2 if s == "W4A8_DYNAMIC" and self.fmt.new_layout else 1  # two int4 a byte along N
        out = [TensorSpec("weight", out_pack=packed)]
        if s in ("W8A8", "W8A8_MIX"):
            out += [
                TensorSpec("input_scale", (1,), dtype=torch.float32, merge="same"),
                TensorSpec("input_offset", (1,), dtype=torch.float32, merge="same"),
                TensorSpec("quant_bias", ("N",), dtype=torch.int32, rank0_only=True),
                TensorSpec("deq_scale", ("N",)),
            ]
        # v0's W8A8 adds weight_scale/offset beside deq_scale (unused); v1's W8A8 has none; WFP8's offset is zeros
        out += scales("weight_scale", "weight_offset", optional=s == "W8A8")
        if s == "W4A8_DYNAMIC":
            second = self.fmt.shape(f"{first}.weight_scale_second")
            if second is not None:  # v0's two-stage per-group
                g = -(-k // second[-1])
                out += [TensorSpec(n, ("N", "K"), in_pack=g) for n in ("weight_scale_second", "weight_offset_second")]
            scale_bias = self.fmt.shape(f"{first}.scale_bias")
            if scale_bias is not None:  # [N, 1] column-, [N, 16] row-parallel (one partial sum per potential rank)
                out.append(TensorSpec("scale_bias", ("N", scale_bias[-1])))
        return [*out, bias_spec(spec)]

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        canonical(layer, self.scheme, spec.prefix, self.fmt)
        prepare(layer, layer.ops, self.scheme)

    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        y = compute(layer.ops, layer, self.scheme, x, is_prefill)  # [T, N_local]
        return y if layer.bias is None else y + layer.bias.to(y.dtype)

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return dequantized(layer, self.scheme)


class ModelSlimMoEMethod(MoEMethod):
    """One label's stacked experts (w13 or w2), read per expert through the linear method and stacked [E, ...]."""

    def __init__(self, fmt: ModelSlim, scheme: str):
        self.expert_method = ModelSlimLinearMethod(fmt, scheme)
        self.fmt, self.scheme = fmt, scheme

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        canonical(layer, self.scheme, f"{spec.prefix} ({spec.which})", self.fmt)
        if self.scheme in LOOPED:
            layer.per_expert = nn.ModuleList(_expert(layer, e, self.scheme) for e in range(spec.expert_shard.length))
            if self.scheme != "W8A8_MIX":  # MIX's prefill reads the stacked weight through the grouped op
                del layer.qweight

    def apply(
        self, layer: nn.Module, x: torch.Tensor, group_counts: torch.Tensor, ops: TorchOps, is_prefill: bool
    ) -> torch.Tensor:
        s = self.scheme
        if s in ACT_BITS and (s != "W8A8_MIX" or is_prefill):
            y = ops.grouped_dynamic_quant_matmul(
                x, layer.qweight, layer.weight_scale, group_counts, ACT_BITS[s], layer.group
            )
            bias = getattr(layer, "float_bias", layer.bias)
        elif s == "W8A16":
            y = ops.grouped_weight_quant_matmul(
                x, layer.qweight, layer.weight_scale.to(x.dtype), group_counts, layer.weight_offset.to(x.dtype), layer.group
            )
            bias = layer.bias
        else:  # W8A8 static (MIX in decode), fp8, MX: expert by expert
            y = x.new_zeros(x.shape[0], layer.spec.local_shape[1])  # [M, N]
            start = 0
            for e, count in enumerate(group_counts.tolist()):
                if count:
                    rows = slice(start, start + count)
                    y[rows] = compute(ops, layer.per_expert[e], s, x[rows], is_prefill=False)
                start += count
            bias = layer.bias
        return y if bias is None else y + expert_rows(bias.to(y.dtype), group_counts, y.shape[0])

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """Read from the tensors as loaded: valid on tables whose prepare_weight keeps [N, K] (the references)."""
        if self.scheme in LOOPED:
            return torch.stack([dequantized(m, self.scheme) for m in layer.per_expert])
        return dequantized(layer, self.scheme)


def _expert(layer: nn.Module, e: int, scheme: str) -> nn.Module:
    """Expert e's canonical tensors (views of the stacked ones) in a module of its own, prepared for the kernels."""
    m = nn.Module()
    for name, value in layer.named_buffers(recurse=False):
        if value is not None and name not in ("bias", "float_bias"):
            m.register_buffer(name, value[e], persistent=False)
    m.group = layer.group
    prepare(m, layer.ops, scheme)
    return m


# ---- the canonical form: qweight [.., N, K] (int4 values unpacked to int8), weight_scale f32 [.., N] or [.., N, G] --
def canonical(layer: nn.Module, scheme: str, where: str, fmt: ModelSlim) -> None:
    """Checkpoint tensors -> what `compute` reads. `group` is 0 for one scale per channel. Checkpoint-only tensors
    go: scale_bias, v0's weight_scale/offset beside deq_scale, and a static scheme's `.bias` (inside quant_bias)."""
    w = layer.weight
    del layer.weight
    if scheme == "W4A8_DYNAMIC" and fmt.new_layout:
        w = unpack_int4_along_n(w)
    # a buffer, so that .to(device) moves it (later assignments to the name keep it one)
    layer.register_buffer("qweight", w if scheme in (*FP8_SCHEMES, *MX_SCHEMES) else w.to(torch.int8), persistent=False)
    layer.group = 0
    _drop(layer, "scale_bias")
    if scheme in ("W8A8", "W8A8_MIX"):
        ds = layer.deq_scale
        if ds.dtype == torch.int64:  # fp16/fp32 models: the float32 bits (save/utils/deqscale.py)
            ds = ds.to(torch.int32).view(torch.float32)
        layer.deq_scale = ds.float()
        # the float bias is folded into quant_bias (formats-modelslim.md §2): the static formula must not add it;
        # MIX's dynamic formula (prefill) does
        if scheme == "W8A8_MIX" and layer.bias is not None:
            layer.register_buffer("float_bias", layer.bias, persistent=False)
        layer.bias = None
    if scheme == "W8A8":
        _drop(layer, "weight_scale", "weight_offset")
        return
    if scheme in MX_SCHEMES:
        return
    scale, offset = layer.weight_scale, getattr(layer, "weight_offset", None)
    K = layer.qweight.shape[-1]
    layer.group = 0 if scale.shape[-1] == 1 else -(-K // scale.shape[-1])
    if not layer.group:
        scale, offset = scale.squeeze(-1), None if offset is None else offset.squeeze(-1)
    layer.weight_scale = scale
    if scheme == "W8A16":
        layer.weight_offset = offset
    else:
        _require_zero(offset, where, fmt)
        _drop(layer, "weight_offset")
    if scheme == "W4A8_DYNAMIC" and hasattr(layer, "weight_scale_second"):
        _two_stage(layer)


def _drop(layer: nn.Module, *names: str) -> None:
    for name in names:
        if hasattr(layer, name):
            delattr(layer, name)


def _two_stage(layer: nn.Module) -> None:
    """v0's two-stage W4A8: W = s1[n] s2[n, g] (w - o2[n, g]), s2 integer-valued. When s2 (w - o2) fits int8 it is
    the int8 weight of a per-channel W8A8_DYNAMIC (exact); else the int4 values keep the per-group scale s1 s2."""
    s2, o2 = layer.weight_scale_second.float(), layer.weight_offset_second.float()  # [.., N, G]
    K = layer.qweight.shape[-1]
    g = -(-K // s2.shape[-1])
    q = layer.qweight.float() - o2.repeat_interleave(g, dim=-1)[..., :K]  # [.., N, K]
    w8 = q * s2.repeat_interleave(g, dim=-1)[..., :K]
    if torch.equal(w8, w8.round()) and w8.abs().max() <= 127:
        layer.qweight = w8.to(torch.int8)
    else:
        layer.qweight, layer.group = q.to(torch.int8), g
        layer.weight_scale = layer.weight_scale.unsqueeze(-1) * s2  # [.., N, G]
    _drop(layer, "weight_scale_second", "weight_offset_second")


def _require_zero(offset: torch.Tensor | None, where: str, fmt: ModelSlim) -> None:
    if offset is not None and offset.any():
        raise CheckpointError(
            fmt.path, f"{where}.weight_offset",
            f"non-zero weight_offset (max |offset| {offset.abs().max().item():.4g}) under a scheme that quantizes "
            f"activations: msmodelslim writes symmetric weights there (zeros); asymmetric ones are not served",
        )


def prepare(layer: nn.Module, ops: TorchOps, scheme: str) -> None:
    """Once: the weight into the device's kernel layout (the NPU transposes int8/fp8 and packs int4)."""
    if scheme in ("WFP8AFP8_DYNAMIC", *MXFP4_ACT_BITS) or (layer.group and scheme != "W8A16"):
        return  # read as loaded: fp8_dynamic_matmul, mxfp4_quant_matmul, the per-group dynamic op
    if scheme == "W8A8_MXFP8":
        layer.qweight, layer.weight_scale = ops.prepare_weight(layer.qweight, "fp8"), ops.prepare_mx_scale(layer.weight_scale)
    else:
        kind = "int4" if scheme == "W4A4_DYNAMIC" else "int8"  # W4A8's int4 values meet int8 activations
        layer.qweight = ops.prepare_weight(layer.qweight, kind)


def compute(ops: TorchOps, t: nn.Module, scheme: str, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
    """x [T, K] -> [T, N] from the canonical, prepared tensors of `t` (a Linear, or one expert)."""
    if scheme == "W8A8" or (scheme == "W8A8_MIX" and not is_prefill):
        x_q = ops.static_quant(x, t.input_scale, t.input_offset)
        return ops.quant_matmul(x_q, t.qweight, t.deq_scale, bias=t.quant_bias, out_dtype=x.dtype)
    if scheme in ACT_BITS:
        if t.group:
            return ops.dynamic_group_quant_matmul(x, t.qweight, t.weight_scale, ACT_BITS[scheme], t.group)
        x_q, s_x = ops.dynamic_quant(x, bits=ACT_BITS[scheme])
        y = ops.quant_matmul(x_q, t.qweight, t.weight_scale, pertoken_scale=s_x, out_dtype=x.dtype)
        bias = getattr(t, "float_bias", None)  # MIX in prefill
        return y if bias is None else y + bias.to(y.dtype)
    if scheme == "W8A16":
        return ops.weight_quant_matmul(x, t.qweight, t.weight_scale.to(x.dtype), t.weight_offset.to(x.dtype), t.group)
    if scheme == "WFP8AFP8_DYNAMIC":
        return ops.fp8_dynamic_matmul(x, t.qweight, t.weight_scale)
    if scheme in MXFP4_ACT_BITS:
        return ops.mxfp4_quant_matmul(x, t.qweight, t.weight_scale, MXFP4_ACT_BITS[scheme])
    return ops.mx_quant_matmul(x, t.qweight, t.weight_scale)  # W8A8_MXFP8


def dequantized(t: nn.Module, scheme: str) -> torch.Tensor:
    """The effective float32 weight [.., N, K] of canonical tensors in the reference layout (the test oracle's)."""
    w = t.qweight.float()
    K = w.shape[-1]
    if scheme == "W8A8":
        return w * (t.deq_scale / t.input_scale).unsqueeze(-1)  # weight_scale = deq_scale / input_scale
    if scheme in MX_SCHEMES:  # E8M0 exponents per 32 along K; FP4 weights unpacked first
        q = fp4_unpack(t.qweight) if scheme in MXFP4_ACT_BITS else w
        return mx_dequantize(q, t.weight_scale.to(torch.int32) - 127)
    s = t.weight_scale.float()
    s = s.repeat_interleave(t.group, dim=-1)[..., :K] if t.group else s.unsqueeze(-1)
    if scheme == "W8A16":
        o = t.weight_offset.float()
        w = w - (o.repeat_interleave(t.group, dim=-1)[..., :K] if t.group else o.unsqueeze(-1))
    return w * s


def unpack_int4_along_n(packed: torch.Tensor) -> torch.Tensor:
    """W4A8 with `version`: [.., N/2, K] int8, byte [j, k] = w[2j, k] (low nibble) | w[2j+1, k] (high nibble), each
    two's-complement int4 (save/utils/pack.py::w4a8_pack_int4) -> [.., N, K] int8 in [-8, 7]."""
    b = packed.to(torch.int16) & 0xFF
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    return torch.stack((lo, hi), dim=-2).flatten(-3, -2).to(torch.int8)  # [.., N/2, 2, K] -> rows 2j, 2j+1
