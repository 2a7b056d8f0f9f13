"""compressed-tensors checkpoints (llm-compressor): integer weight-only (W4A16, W8A16, `pack-quantized`) and dynamic
integer activations (W8A8, W4A8, `int-quantized`), Linear and MoE experts, detected from `quant_method:
compressed-tensors`.

The config's `config_groups` each give `targets` (a module class such as "Linear", a name, or "re:<regex>"), a
`weights` scheme (num_bits, type int, strategy channel | group, group_size, symmetric, actorder) and
`input_activations` (None for weight-only; else num_bits 8, strategy token, dynamic); `ignore` leaves modules float
(names or "re:" regexes); the first group that targets a module gives its scheme (compressed-tensors' own matching:
`re.match` on the module name, a class name matching every linear).

| format | tensors per module | w | compute |
|---|---|---|---|
| pack-quantized | weight_packed int32 [N, ceil(K b/32)] (q + 2^(b-1), lowest bits first along K), weight_scale [N, G] or [N, 1], weight_zero_point (asymmetric; int32 packed along N, [ceil(N b/32), G]), weight_g_idx [K] (act order), weight_shape [2] | (q - zp) s | weight_only.pack: the group kernel (W4A16, W8A16) |
| int-quantized | weight int8 [N, K] (int4 values in [-8, 7] for W4A8), weight_scale [N, 1] or [N, G] | q s | per-token int8 x (dynamic_quant): quant_matmul (per channel) or dynamic_group_quant_matmul (groups); MoE: grouped_dynamic_quant_matmul |

Activation quantization follows compressed-tensors' dynamic per-token rule: s = max|x| / 127 per token, x_q =
clamp(round(x / s), -128, 127) (symmetric; the op tables' dynamic_quant). Asymmetric activations, static activation
scales, float (fp8/nvfp4) types, 2:4 sparsity and W4A8 with learned activation clipping (`activation_use_clip`, a
converted DeepSeek layout no producer here writes) are refused at load by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from shardserve.workers.device.quant_ops import dynamic_quant_reference
from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.quant import weight_only
from shardserve.workers.quant.base import (
    LinearMethod,
    LinearSpec,
    MoEMethod,
    MoESpec,
    TensorSpec,
    bias_spec,
    register,
)
from shardserve.workers.quant.gptq import WeightOnlyFormat, config_int
from shardserve.workers.quant.unquantized import expert_rows
from shardserve.workers.quant.weight_only import Unpacked

SERVED_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


@dataclass(frozen=True)
class CTScheme:
    format: str
    bits: int
    group: int  # -1: per channel
    sym: bool
    act_bits: int = 0  # 0: weight-only; 8: dynamic per-token int8
    act_order: bool = False

    def __str__(self) -> str:
        g = "channel" if self.group == -1 else f"g{self.group}"
        act = f"A{self.act_bits} dynamic" if self.act_bits else "A16"
        return f"{self.format} W{self.bits}{act} {g} {'sym' if self.sym else 'asym'}{' act-order' if self.act_order else ''}"


@register
class CompressedTensors(WeightOnlyFormat):
    name = "compressed-tensors"
    methods = ("compressed-tensors",)
    quantized_suffixes = (".weight_packed", ".weight_scale")

    def __init__(self, path: str, qcfg: dict):
        super().__init__(path, qcfg)
        top_format = qcfg.get("format")
        if qcfg.get("sparsity_config"):
            raise CheckpointError(path, "sparsity_config", "sparse compressed-tensors checkpoints are not served")
        if qcfg.get("kv_cache_scheme"):
            raise CheckpointError(path, "kv_cache_scheme", "a quantized KV cache is not served by this build")
        if "activation_use_clip" in qcfg or any("activation_use_clip" in (g or {}) for g in (qcfg.get("config_groups") or {}).values()):
            raise CheckpointError(
                path, "activation_use_clip",
                "W4A8 with learned activation clipping (converted DeepSeek checkpoints: w13/w2 biases and alphas) is not "
                "served by this build",
            )
        self.groups: list[tuple[list[str], CTScheme]] = []
        for gname, group in (qcfg.get("config_groups") or {}).items():
            self.groups.append((list(group.get("targets") or []), _scheme(path, gname, group, top_format)))
        if not self.groups:
            raise CheckpointError(path, "config_groups", "no quantization groups in the compressed-tensors config")
        self.ignore = list(qcfg.get("ignore") or [])

    def config_scheme(self, module: str) -> CTScheme | None:
        if any(_matches(p, module) for p in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(t, module) or t in ("Linear", "LinearBase") for t in targets):
                return scheme
        return None

    def marker(self, module: str, scheme: CTScheme) -> str:
        return f"{module}.weight_packed" if scheme.format == "pack-quantized" else f"{module}.weight_scale"

    def make_linear(self, scheme: CTScheme) -> LinearMethod:
        cls = CTPackedLinearMethod if scheme.format == "pack-quantized" else CTIntLinearMethod
        return cls(self, scheme)

    def make_moe(self, scheme: CTScheme) -> MoEMethod:
        if scheme.format == "pack-quantized":
            return weight_only.UnpackingMoEMethod(self.make_linear(scheme))
        return CTIntMoEMethod(self.make_linear(scheme))


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module or module.endswith(f".{pattern}") and "." in pattern


def _scheme(path: str, gname: str, group: dict, top_format: str | None) -> CTScheme:
    where = f"config_groups.{gname}"
    w = group.get("weights") or {}
    fmt = group.get("format") or top_format
    if fmt not in SERVED_FORMATS:
        raise CheckpointError(path, f"{where}.format", f"compressed-tensors format {fmt!r} is not served: {SERVED_FORMATS}")
    if w.get("type", "int") != "int":
        raise CheckpointError(path, f"{where}.weights.type", f"{w.get('type')!r} weights are not served (int)")
    bits = config_int(w, path, "num_bits")
    strategy = w.get("strategy", "channel")
    if strategy not in ("channel", "group"):
        raise CheckpointError(path, f"{where}.weights.strategy", f"{strategy!r} is not served (channel, group)")
    gsize = config_int(w, path, "group_size") if strategy == "group" else -1
    act = group.get("input_activations")
    act_bits = 0
    if act:
        act_bits = config_int(act, path, "num_bits")
        ok = (act.get("type", "int") == "int" and act_bits == 8 and act.get("dynamic") is True
              and act.get("strategy") == "token" and act.get("symmetric", True))
        if not ok:
            raise CheckpointError(
                path, f"{where}.input_activations",
                f"{act} is not served: activations must be dynamic per-token symmetric int8",
            )
        if fmt == "pack-quantized":
            raise CheckpointError(path, f"{where}.format", "pack-quantized weights with quantized activations are not served")
        if not w.get("symmetric", True):
            raise CheckpointError(path, f"{where}.weights.symmetric", "asymmetric weights with int8 activations are not served")
    weight_only.check_bits(bits, f"{path}: {where}.weights.num_bits", (4, 8))
    # actorder "group" stores weight_g_idx; "weight" and "static" reorder only while quantizing (no g_idx)
    return CTScheme(fmt, bits, gsize, bool(w.get("symmetric", True)), act_bits, w.get("actorder") == "group")


# ---- weight-only, packed ---------------------------------------------------------------------------------------
class CTPackedLinearMethod(weight_only.UnpackingLinearMethod):
    def __init__(self, fmt: CompressedTensors, scheme: CTScheme):
        self.fmt, self.scheme = fmt, scheme

    def check_shapes(self, layer: nn.Module, spec: LinearSpec) -> None:
        """`weight_shape` ([N, K] of each module, every expert's where stacked) says what the layer is."""
        found = getattr(layer, "weight_shape", None)
        if found is None:
            return
        found = found.reshape(-1, len(spec.sub_prefixes), 2)  # [experts or 1, modules, 2]
        for i, (sub, n) in enumerate(zip(spec.sub_prefixes, spec.output_sizes)):
            bad = [tuple(v) for v in found[:, i].tolist() if tuple(v) != (n, spec.input_size)]
            if bad:
                raise CheckpointError(
                    self.fmt.path, f"{sub}.weight_shape", f"says {list(bad[0])}, but the model's layer is [{n}, {spec.input_size}]"
                )

    def group(self, k: int) -> int:
        return k if self.scheme.group == -1 else self.scheme.group

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        s, k = self.scheme, spec.input_size
        per, g = 32 // s.bits, self.group(k)
        out = [
            TensorSpec("weight_packed", ("N", "K"), in_pack=per),
            # every group's scales on every rank: a row-parallel slice may start inside a group, act order spans all
            TensorSpec("weight_scale", ("N", -(-k // g)), dtype=torch.float32),
            TensorSpec("weight_shape", (2,), merge="stack", optional=True),  # [N, K] of each module, checked
        ]
        if not s.sym:
            out.append(TensorSpec("weight_zero_point", ("N", -(-k // g)), out_pack=per))
        out.append(TensorSpec("weight_g_idx", ("K",), merge="same", optional=not s.act_order))
        return [*out, bias_spec(spec)]

    def unpack(self, layer: nn.Module, spec: LinearSpec) -> Unpacked:
        s, n, k = self.scheme, spec.local_out, spec.local_in
        self.check_shapes(layer, spec)
        u = weight_only.unpack_along_cols(layer.weight_packed, s.bits)[..., :k]  # [.., N, K], q + 2^(b-1)
        zero = None
        if not s.sym:
            zp = weight_only.unpack_along_rows(layer.weight_zero_point, s.bits)[..., :n, :]  # [.., N, G], zp + 2^(b-1)
            zero = zp.float()
        g_idx = getattr(layer, "weight_g_idx", None)
        g = self.group(spec.input_size)
        g_idx = weight_only.trivial_g_idx(spec.input_shard.start, k, g) if g_idx is None else g_idx.long()
        scale = layer.weight_scale.float()
        for name in ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape", "weight_g_idx"):
            if hasattr(layer, name):
                delattr(layer, name)
        return Unpacked(u.contiguous(), scale, zero, g_idx, s.bits, g)


# ---- int8 activations ------------------------------------------------------------------------------------------
class CTIntLinearMethod(LinearMethod):
    """int-quantized weights [N, K] int8 with per-channel or per-group scales; activations quantized per token."""

    def __init__(self, fmt: CompressedTensors, scheme: CTScheme):
        self.fmt, self.scheme = fmt, scheme

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        s = self.scheme
        dims = ("N", 1) if s.group == -1 else ("N", "K")
        scale = TensorSpec("weight_scale", dims, in_pack=1 if s.group == -1 else s.group, dtype=torch.float32)
        out = [TensorSpec("weight"), scale, TensorSpec("weight_zero_point", dims, in_pack=scale.in_pack, optional=True)]
        return [*out, bias_spec(spec)]

    def check(self, layer: nn.Module, where: str) -> None:
        w = layer.weight
        if w.dtype != torch.int8:
            raise CheckpointError(self.fmt.path, f"{where}.weight", f"expected int8 (int-quantized), found {w.dtype}")
        lo, hi = -(1 << (self.scheme.bits - 1)), (1 << (self.scheme.bits - 1)) - 1
        if int(w.min()) < lo or int(w.max()) > hi:
            raise CheckpointError(self.fmt.path, f"{where}.weight", f"values outside the {self.scheme.bits}-bit range [{lo}, {hi}]")
        zp = getattr(layer, "weight_zero_point", None)
        if zp is not None and bool((zp != 0).any()):
            raise CheckpointError(self.fmt.path, f"{where}.weight_zero_point", "non-zero weight zero points are not served with int8 activations")
        if hasattr(layer, "weight_zero_point"):
            del layer.weight_zero_point

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        self.check(layer, spec.prefix)
        layer.group = 0 if self.scheme.group == -1 else self.scheme.group
        layer.weight_scale = layer.weight_scale.reshape(layer.weight.shape[0], -1)
        if not layer.group:
            layer.weight_scale = layer.weight_scale.reshape(-1)
            layer.qweight = layer.ops.prepare_weight(layer.weight, "int8")
            del layer.weight

    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        ops = layer.ops
        if layer.group:
            y = ops.dynamic_group_quant_matmul(x, layer.weight, layer.weight_scale, 8, layer.group)
        else:
            x_q, s_x = ops.dynamic_quant(x)
            y = ops.quant_matmul(x_q, layer.qweight, layer.weight_scale, s_x, out_dtype=x.dtype)
        return y if layer.bias is None else y + layer.bias.to(y.dtype)

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        if layer.group:
            k = layer.weight.shape[-1]
            return layer.weight.float() * layer.weight_scale.repeat_interleave(layer.group, -1)[..., :k]
        return layer.qweight.float() * layer.weight_scale.unsqueeze(-1)

    def reference(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x_q, s_x = dynamic_quant_reference(x, 8)  # compressed-tensors' dynamic per-token int8 rule
        y = (x_q.float() @ self.reference_weight(layer).T) * s_x.unsqueeze(-1)
        return (y if layer.bias is None else y + layer.bias.float()).to(x.dtype)


class CTIntMoEMethod(MoEMethod):
    def __init__(self, expert_method: CTIntLinearMethod):
        self.expert_method = expert_method

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        self.expert_method.check(layer, f"{spec.prefix} ({spec.which})")
        layer.group = 0 if self.expert_method.scheme.group == -1 else self.expert_method.scheme.group
        e, n = layer.weight.shape[:2]
        layer.weight_scale = layer.weight_scale.reshape(e, n, -1)
        if not layer.group:
            layer.weight_scale = layer.weight_scale.reshape(e, n)

    def apply(self, layer, x, group_counts, ops, is_prefill):
        y = ops.grouped_dynamic_quant_matmul(x, layer.weight, layer.weight_scale, group_counts, 8, layer.group)
        return y if layer.bias is None else y + expert_rows(layer.bias.to(y.dtype), group_counts, y.shape[0])

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        s = layer.weight_scale.float()
        if layer.group:
            s = s.repeat_interleave(layer.group, -1)[..., : layer.weight.shape[-1]]
        else:
            s = s.unsqueeze(-1)
        return layer.weight.float() * s
