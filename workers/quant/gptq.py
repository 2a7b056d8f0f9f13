"""GPTQ (AutoGPTQ, GPTQModel), AWQ (AutoAWQ GEMM) and AutoRound checkpoints: integer weight-only linears and MoE
experts, detected from config.json's `quantization_config.quant_method`.

Layouts (/work/shared/formats.md; W is [N out, K in], b bits, G the group size, ng = ceil(K / G) groups, the last
one partial where G does not divide K):

| layout | qweight | qzeros | scales | g_idx | zero |
|---|---|---|---|---|---|
| gptq (GPTQ; AutoRound `auto_round`, `auto_round:auto_gptq`) | int32 [K*b/32, N], packed along K | int32 [ng, N*b/32] along N | fp16 [ng, N] | int32 [K] (act order: permuted) | v1: stored + 1; v2 (`checkpoint_format: gptq_v2`): stored |
| awq (AWQ GEMM; AutoRound `auto_round:auto_awq`) | int32 [K, N*b/32], along N, order 0 2 4 6 1 3 5 7 | int32 [ng, N*b/32], same order | fp16 [ng, N] | - | stored |

Every module gets a scheme from the config: bits, group, sym, act order, or None (left float). GPTQModel's `dynamic`
rules override it per module (first matching regex: `-:` leaves the module float, `+:` or none overrides keys);
AutoRound's `extra_config` does per module (bits >= 16: float). The files must agree: a quantized module without
its tensors, or a module the config leaves float with qweight in the files, fails at load naming the tensor; a
different bit width or group size shows as a shape mismatch naming the tensor. Layers fused by the model (qkv,
gate_up, an MoE's w13) need one scheme over their modules.

TP: column-parallel layers split N (qweight and scales columns, qzeros in packs of 32/b columns); row-parallel ones
split K (qweight rows in packs of 32/b; g_idx rows) and keep every group's scales and zeros, so that a slice
starting inside a group, and act order, need nothing more. The unpacked values go through weight_only.pack into
the device's group kernel (weights stay b-bit).
"""

from __future__ import annotations

import os
import re
from abc import abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from shardserve.workers.loader import read_config
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.quant import weight_only
from shardserve.workers.quant.base import (
    LinearMethod,
    LinearSpec,
    MoEMethod,
    MoESpec,
    QuantConfig,
    TensorSpec,
    bias_spec,
    register,
)
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod
from shardserve.workers.quant.weight_only import Unpacked

AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ packs column order_map[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i] at nibble i
# modules a producer may leave float beside quantized ones without saying so (MoE routers: out = num_experts)
ROUTER = re.compile(r"(^|\.)(mlp\.gate|shared_expert_gate|router)$")


@dataclass(frozen=True)
class Scheme:
    """One module's integer weight-only quantization."""

    layout: str  # "gptq" | "awq"
    bits: int
    group: int  # -1: one group per output channel (the whole K)
    sym: bool
    act_order: bool = False
    zero_offset: int = 0  # added to the stored zeros (GPTQ v1 stores zero - 1)

    def __str__(self) -> str:
        g = "channel" if self.group == -1 else f"g{self.group}"
        return f"{self.layout} w{self.bits} {g} {'sym' if self.sym else 'asym'}{' act-order' if self.act_order else ''}"


class WeightOnlyFormat(QuantConfig):
    """A config.json-declared integer weight-only format: a Scheme (or None: float) per checkpoint module."""

    name: ClassVar[str]

    def __init__(self, path: str, qcfg: dict):
        self.path, self.qcfg = path, qcfg
        self._names: set[str] = set()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._linear: dict[Scheme, LinearMethod] = {}
        self._moe: dict[Scheme, MoEMethod] = {}

    @classmethod
    def detect(cls, model_path: str) -> WeightOnlyFormat | None:
        found = declared_quantization(model_path)
        if found is None:
            return None
        path, qcfg = found
        method = str(qcfg.get("quant_method", "")).lower()
        return cls(path, qcfg) if method in cls.methods else None

    methods: ClassVar[tuple[str, ...]]

    @abstractmethod
    def config_scheme(self, module: str) -> Scheme | None:
        """The scheme the config gives `module`, before the files are consulted."""

    # ---- the files must agree with the config ---------------------------------------------------------------
    quantized_suffixes: ClassVar[tuple[str, ...]] = (".qweight",)  # tensors only a quantized module has

    def marker(self, module: str, scheme) -> str:
        """The tensor a module of `scheme` must have in the files."""
        return f"{module}.qweight"

    def bind(self, source: CheckpointSource) -> None:
        self._names = set(source.names())
        self._shapes = {n: tuple(source.shape(n)) for n in self._names}
        for name in sorted(self._names):
            for suffix in self.quantized_suffixes:
                module = name[: -len(suffix)]
                if name.endswith(suffix) and self.config_scheme(module) is None:
                    raise CheckpointError(
                        source.file_of(name), name,
                        f"the {self.name} config ({os.path.basename(self.path)}: its rules, ignore list or targets) "
                        f"leaves {module} unquantized, but the files hold its quantized tensors",
                    )

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    def scheme_of(self, module: str) -> Hashable:
        scheme = self.config_scheme(module)
        if scheme is None or not self._names:
            return scheme
        marker = self.marker(module, scheme)
        if marker in self._names:
            return scheme
        if f"{module}.weight" in self._names and ROUTER.search(module):
            return None  # a router left float by the producer
        raise CheckpointError(
            self.path, marker,
            f"missing: the {self.name} config quantizes {module} ({scheme})"
            + (", but the files hold it as a float weight" if f"{module}.weight" in self._names else ""),
        )

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        scheme = self.uniform_scheme(spec.prefix, spec.sub_prefixes)
        if scheme is None:
            return FLOAT_LINEAR
        if scheme not in self._linear:
            self._linear[scheme] = self.make_linear(scheme)
        return self._linear[scheme]

    def moe_method(self, spec: MoESpec) -> MoEMethod:
        scheme = self.uniform_scheme(f"{spec.prefix} ({spec.which})", spec.modules)
        if scheme is None:
            return FLOAT_MOE
        if scheme not in self._moe:
            self._moe[scheme] = self.make_moe(scheme)
        return self._moe[scheme]

    def make_linear(self, scheme) -> LinearMethod:
        """One scheme's linear method (made once, shared by every layer of that scheme)."""
        return IntWeightOnlyLinearMethod(self, scheme)

    def make_moe(self, scheme) -> MoEMethod:
        return weight_only.UnpackingMoEMethod(self.make_linear(scheme))


FLOAT_LINEAR = UnquantizedLinearMethod()
FLOAT_MOE = UnquantizedMoEMethod()


def declared_quantization(model_path: str) -> tuple[str, dict] | None:
    """(file, quantization config) from config.json's `quantization_config`, else AutoGPTQ's quantize_config.json."""
    if not os.path.isdir(model_path):
        return None
    cfg_path = os.path.join(model_path, "config.json")
    if os.path.isfile(cfg_path):
        qcfg = read_config(cfg_path).get("quantization_config")
        if isinstance(qcfg, dict):
            return cfg_path, qcfg
    legacy = os.path.join(model_path, "quantize_config.json")
    if os.path.isfile(legacy):
        return legacy, dict(read_config(legacy), quant_method="gptq")
    return None


def config_int(qcfg: dict, path: str, *keys: str, default=None) -> int:
    for k in keys:
        if k in qcfg:
            try:
                return int(qcfg[k])
            except (TypeError, ValueError):
                raise CheckpointError(path, k, f"expected an integer, found {qcfg[k]!r}") from None
    if default is None:
        raise CheckpointError(path, keys[0], "missing from the quantization config")
    return default


# ---- the formats ---------------------------------------------------------------------------------------------------
@register
class GPTQ(WeightOnlyFormat):
    name = "gptq"
    methods = ("gptq",)

    def __init__(self, path: str, qcfg: dict):
        super().__init__(path, qcfg)
        fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(path, "checkpoint_format", f"{fmt!r} is not served (gptq, gptq_v2)")
        if qcfg.get("lm_head"):
            raise CheckpointError(path, "lm_head", "a quantized LM head is not served; quantize with lm_head=False")
        self.base = dict(bits=config_int(qcfg, path, "bits"), group_size=config_int(qcfg, path, "group_size", default=-1),
                         sym=bool(qcfg.get("sym", True)), desc_act=bool(qcfg.get("desc_act", False)))
        self.zero_offset = 0 if fmt == "gptq_v2" else 1
        self.dynamic = qcfg.get("dynamic") or {}
        self.in_blocks = qcfg.get("modules_in_block_to_quantize")  # AutoGPTQ: [[names], ...] quantized per block
        weight_only.check_bits(self.base["bits"], f"{path}: quantization_config.bits")

    def config_scheme(self, module: str) -> Scheme | None:
        if module.endswith("lm_head") or ".layers." not in f".{module}":
            return None
        if self.in_blocks and not any(module.endswith(f".{m}") for block in self.in_blocks for m in block):
            return None
        cfg = dict(self.base)
        for pattern, override in self.dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], module):
                    return None
            elif re.match(pattern.removeprefix("+:"), module):
                cfg.update({k: v for k, v in (override or {}).items() if k in cfg})
                break
        weight_only.check_bits(int(cfg["bits"]), f"{self.path}: {module} (dynamic)")
        return Scheme("gptq", int(cfg["bits"]), int(cfg["group_size"]), bool(cfg["sym"]), bool(cfg["desc_act"]),
                      self.zero_offset)


@register
class AWQ(WeightOnlyFormat):
    name = "awq"
    methods = ("awq",)

    def __init__(self, path: str, qcfg: dict):
        super().__init__(path, qcfg)
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(path, "version", f"AWQ {version!r} packing is not served (gemm)")
        self.bits = config_int(qcfg, path, "bits", "w_bit")
        self.group = config_int(qcfg, path, "group_size", "q_group_size", default=-1)
        self.zero_point = bool(qcfg.get("zero_point", True))
        self.skip = list(qcfg.get("modules_to_not_convert") or [])
        weight_only.check_bits(self.bits, f"{path}: quantization_config.bits", (4,))

    def config_scheme(self, module: str) -> Scheme | None:
        if module.endswith("lm_head") or ".layers." not in f".{module}" or any(s in module for s in self.skip):
            return None
        return Scheme("awq", self.bits, self.group, not self.zero_point)


@register
class AutoRound(WeightOnlyFormat):
    """AutoRound (Intel auto-round) exports: `packing_format` auto_round (its own: GPTQ's layout without g_idx, raw
    zeros), auto_round:auto_gptq (GPTQ v1: zero - 1) or auto_round:auto_awq (AWQ); `extra_config` per module, its
    keys module names or regexes (auto-round writes both: the pattern it was given and the names it resolved)."""

    name = "auto-round"
    methods = ("auto-round", "intel/auto-round", "auto_round")
    LAYOUTS: ClassVar[dict[str, tuple[str, int]]] = {
        "auto_round": ("gptq", 0), "auto_round:auto_gptq": ("gptq", 1), "auto_round:gptq": ("gptq", 1),
        "auto_gptq": ("gptq", 1), "auto_round:auto_awq": ("awq", 0), "auto_round:awq": ("awq", 0),
    }

    def __init__(self, path: str, qcfg: dict):
        super().__init__(path, qcfg)
        packing = str(qcfg.get("packing_format", "auto_round"))
        if packing not in self.LAYOUTS:
            raise CheckpointError(path, "packing_format", f"{packing!r} is not served; served: {sorted(self.LAYOUTS)}")
        self.layout, self.zero_offset = self.LAYOUTS[packing]
        if str(qcfg.get("data_type", "int")) != "int" or config_int(qcfg, path, "act_bits", default=16) < 16:
            raise CheckpointError(
                path, "data_type",
                f"AutoRound {qcfg.get('data_type')!r} weights with {qcfg.get('act_bits')}-bit activations are not "
                f"served (integer weight-only: data_type int, act_bits 16)",
            )
        self.base = dict(bits=config_int(qcfg, path, "bits"), group_size=config_int(qcfg, path, "group_size", default=128),
                         sym=bool(qcfg.get("sym", True)))
        self.extra = qcfg.get("extra_config") or {}
        blocks = qcfg.get("block_name_to_quantize") or qcfg.get("to_quant_block_names")
        self.blocks = [blocks] if isinstance(blocks, str) else list(blocks or [])
        self.blocks = [b for item in self.blocks for b in (item.split(",") if isinstance(item, str) else item)]

    def config_scheme(self, module: str) -> Scheme | None:
        if self.blocks and not any(module.startswith(f"{b}.") for b in self.blocks):
            cfg = None
        elif module.endswith("lm_head") or ".layers." not in f".{module}":
            cfg = None
        else:
            cfg = dict(self.base)
        override = self.extra.get(module)
        if override is None:  # a pattern key (auto-round writes the regex it was given beside the names it resolved)
            override = next((v for k, v in self.extra.items() if _is_regex(k) and re.search(k, module)), None)
        if override is not None:
            cfg = dict(cfg or self.base)
            cfg.update({k: v for k, v in override.items() if k in cfg})
        if cfg is None or int(cfg["bits"]) >= 16:
            return None
        bits = int(cfg["bits"])
        weight_only.check_bits(bits, f"{self.path}: {module}", (4,) if self.layout == "awq" else (2, 4, 8))
        return Scheme(self.layout, bits, int(cfg["group_size"]), bool(cfg["sym"]), zero_offset=self.zero_offset)


def _is_regex(key: str) -> bool:
    return any(c in key for c in "*+?[]()|^$\\")


# ---- the methods ---------------------------------------------------------------------------------------------------
class IntWeightOnlyLinearMethod(weight_only.UnpackingLinearMethod):
    """One Scheme's linear: the checkpoint's packed tensors, unpacked at load into weight_only's canonical form and
    packed for the device's group kernel."""

    def __init__(self, fmt: WeightOnlyFormat, scheme: Scheme):
        self.fmt, self.scheme = fmt, scheme

    def group(self, k: int) -> int:
        return k if self.scheme.group == -1 else self.scheme.group

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        s, k = self.scheme, spec.input_size
        per, ng = 32 // s.bits, -(-k // self.group(k))
        if s.layout == "awq":
            qweight = TensorSpec("qweight", ("K", "N"), out_pack=per)
        else:
            stored = self.fmt.shape(f"{spec.sub_prefixes[0]}.qweight")
            padded = stored is not None and stored[0] != -(-k // per) and stored[0] * per == ng * self.group(k)
            # AutoRound's model-free export pads K to whole groups: read the rows whole, cut K at load
            qweight = TensorSpec("qweight", (stored[0], "N") if padded else ("K", "N"), in_pack=1 if padded else per)
        out = [
            qweight,
            TensorSpec("qzeros", (ng, "N"), out_pack=per),
            TensorSpec("scales", (ng, "N"), dtype=torch.float32),
        ]
        if s.layout == "gptq":
            out.append(TensorSpec("g_idx", ("K",), merge="same", optional=not s.act_order))
        return [*out, bias_spec(spec)]

    def unpack(self, layer: nn.Module, spec: LinearSpec) -> Unpacked:
        """The loaded tensors (a leading expert axis allowed) -> w = (u - zero) * scale per g_idx group."""
        s, n, k = self.scheme, spec.local_out, spec.local_in
        if s.layout == "awq":
            u = weight_only.unpack_along_cols(layer.qweight, s.bits, AWQ_UNPACK_ORDER).transpose(-1, -2)  # [.., N, K]
            zeros = weight_only.unpack_along_cols(layer.qzeros, s.bits, AWQ_UNPACK_ORDER)
        else:
            u = weight_only.unpack_along_rows(layer.qweight, s.bits)  # [.., K(+pad), N]
            if u.shape[-2] != k:  # padded K (read whole): this rank's rows
                u = u.narrow(-2, spec.input_shard.start, k)
            u = u.transpose(-1, -2)
            zeros = weight_only.unpack_along_cols(layer.qzeros, s.bits)
        zero = (zeros[..., :n].float() + s.zero_offset).transpose(-1, -2)  # [.., N, ng]
        scale = layer.scales.transpose(-1, -2).float()  # [.., N, ng]
        g_idx = getattr(layer, "g_idx", None)
        if g_idx is None:
            g_idx = weight_only.trivial_g_idx(spec.input_shard.start, k, self.group(spec.input_size))
        else:
            g_idx = g_idx.long()
            ng = scale.shape[-1]
            if bool((g_idx < 0).any()) or bool((g_idx >= ng).any()):
                raise CheckpointError(self.fmt.path, f"{spec.sub_prefixes[0]}.g_idx", f"values outside [0, {ng})")
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            if hasattr(layer, name):
                delattr(layer, name)
        return Unpacked(u.contiguous(), scale, None if s.sym and _is_mid(zero, s.bits) else zero, g_idx, s.bits,
                        self.group(spec.input_size))

def _is_mid(zero: torch.Tensor, bits: int) -> bool:
    return bool((zero == (1 << (bits - 1))).all())
