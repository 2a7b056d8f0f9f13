"""The quantization contract: a format registry, per-layer methods, tensor declarations and sharded loading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from shardserve.workers.loader.source import CheckpointError, CheckpointSource

if TYPE_CHECKING:
    from shardserve.workers.device.base import TorchOps

Parallel = Literal["column", "row", "replicated"]
MoEWhich = Literal["w13", "w2"]


@dataclass(frozen=True)
class Shard:
    """One sub-matrix's rank slice: [start, start+length) of its output (column) or input (row) dim."""

    start: int
    length: int


@dataclass(frozen=True)
class LinearSpec:
    """What a linear layer tells its quant method. W is [N out, K in]; y = x @ W.T.

    A merged layer (qkv, gate/up) is several checkpoint sub-matrices stacked along N, each with its own
    rank slice; `input_shard` is the rank's slice of K (row-parallel) or the whole K.
    """

    prefix: str  # the layer's own name, e.g. model.layers.0.self_attn.qkv_proj
    sub_prefixes: tuple[str, ...]  # checkpoint modules stacked along N, e.g. (...q_proj, ...k_proj, ...v_proj)
    output_sizes: tuple[int, ...]  # full N of each sub-matrix
    output_shards: tuple[Shard, ...]  # this rank's slice of each sub-matrix's N
    input_size: int  # full K
    input_shard: Shard  # this rank's slice of K
    parallel: Parallel
    dtype: torch.dtype

    @property
    def local_out(self) -> int:
        return sum(s.length for s in self.output_shards)

    @property
    def local_in(self) -> int:
        return self.input_shard.length


@dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor of a quantized linear, declared once so one loader shards every format.

    `out_axis`/`in_axis` are the tensor's axes that run along N and K (None: not split that way);
    `out_pack`/`in_pack` divide the slice when values are packed (int4 in int32: 8) or grouped (scales: G).
    """

    name: str  # suffix after the module prefix: weight, qweight, scales, weight_scale, ...
    out_axis: int | None = 0
    in_axis: int | None = 1
    out_pack: int = 1
    in_pack: int = 1
    dtype: torch.dtype | None = None  # cast on load; None keeps the stored dtype
    optional: bool = False


class LinearMethod(ABC):
    """How one linear layer's weights are declared, loaded, transformed and applied."""

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        return [TensorSpec("weight", dtype=spec.dtype)]

    def load(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource) -> None:
        """Read this rank's slice of each declared tensor; sub-matrices are concatenated along N."""
        for t in self.tensors(spec):
            parts = [self.load_part(source, spec, t, sub, shard) for sub, shard in zip(spec.sub_prefixes, spec.output_shards)]
            parts = [p for p in parts if p is not None]
            if not parts:
                continue
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=t.out_axis or 0)
            layer.register_buffer(t.name, value, persistent=False)

    def load_part(
        self, source: CheckpointSource, spec: LinearSpec, t: TensorSpec, sub: str, shard: Shard
    ) -> torch.Tensor | None:
        name = f"{sub}.{t.name}"
        if not source.has(name):
            if t.optional:
                return None
            raise CheckpointError(source.path, name, f"missing (needed by {type(self).__name__} of {spec.prefix})")
        dim, start, length = None, 0, None
        if t.out_axis is not None and spec.parallel == "column":
            dim, start, length = t.out_axis, shard.start // t.out_pack, shard.length // t.out_pack
        elif t.in_axis is not None and spec.parallel == "row":
            s = spec.input_shard
            dim, start, length = t.in_axis, s.start // t.in_pack, -(-s.length // t.in_pack)
        value = source.read(name, dim=dim, start=start, length=length).contiguous()
        return value.to(t.dtype) if t.dtype is not None else value

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        """Once, after load: repack into the kernel's layout, drop checkpoint-only tensors."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, K_local] -> [T, N_local], without bias; the device's kernels are `layer.ops`, its op table."""

    @abstractmethod
    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """The plain dequantized weight [N_local, K_local]: the test oracle."""


@dataclass(frozen=True)
class MoESpec:
    """What an MoE layer tells its quant method about one stacked expert weight (w13 or w2).

    w13 is gate and up stacked along N, per expert [2 * I_local, H] (column-parallel over I); w2 is down,
    per expert [H, I_local] (row-parallel over I). Under expert parallelism a rank holds the experts in
    `expert_shard` whole (`intermediate_shard` is all of I); under TP it holds every expert's I slice.
    """

    prefix: str  # the experts module, e.g. model.layers.0.mlp.experts
    which: MoEWhich
    num_experts: int  # E, all experts of the layer
    expert_shard: Shard  # this rank's experts
    hidden_size: int  # H
    intermediate_size: int  # I, per expert
    intermediate_shard: Shard  # this rank's slice of I
    dtype: torch.dtype

    @property
    def sub_names(self) -> tuple[str, ...]:
        """Per-expert checkpoint modules stacked along N (HF names)."""
        return ("gate_proj", "up_proj") if self.which == "w13" else ("down_proj",)

    @property
    def local_shape(self) -> tuple[int, int, int]:
        """[E_local, N_local, K_local] of the stacked weight on this rank."""
        e, i, h = self.expert_shard.length, self.intermediate_shard.length, self.hidden_size
        return (e, 2 * i, h) if self.which == "w13" else (e, h, i)

    def expert_linear(self, e: int) -> LinearSpec:
        """Expert `e`'s checkpoint modules seen as one linear layer (w13: gate and up merged)."""
        subs = tuple(f"{self.prefix}.{e}.{n}" for n in self.sub_names)
        h, inter, s = self.hidden_size, self.intermediate_size, self.intermediate_shard
        if self.which == "w13":
            name = f"{self.prefix}.{e}.gate_up_proj"
            return LinearSpec(name, subs, (inter, inter), (s, s), h, Shard(0, h), "column", self.dtype)
        return LinearSpec(subs[0], subs, (h,), (Shard(0, h),), inter, s, "row", self.dtype)


class MoEMethod(ABC):
    """How one stacked expert weight (w13 or w2) of an MoE layer is declared, loaded, transformed and applied.

    The default load reads per-expert checkpoints (HF `experts.{e}.gate_proj.weight`, ModelSlim, GPTQ, ...)
    expert by expert through `expert_method`, the format's linear method, so its tensor declarations and
    TP slicing are written once; formats that store experts stacked (GGUF) override `load`.
    """

    expert_method: LinearMethod

    def tensors(self, spec: MoESpec) -> list[TensorSpec]:
        return self.expert_method.tensors(spec.expert_linear(spec.expert_shard.start))

    def load(self, layer: nn.Module, spec: MoESpec, source: CheckpointSource) -> None:
        """Each declared tensor stacked over this rank's experts: [E_local, ...]."""
        local = range(spec.expert_shard.start, spec.expert_shard.start + spec.expert_shard.length)
        for t in self.tensors(spec):
            experts = [self.load_expert(source, spec, t, e) for e in local]
            if any(x is None for x in experts):
                continue  # an optional tensor absent from the checkpoint
            layer.register_buffer(t.name, torch.stack(experts), persistent=False)

    def load_expert(
        self, source: CheckpointSource, spec: MoESpec, t: TensorSpec, e: int
    ) -> torch.Tensor | None:
        """Expert `e`'s rank slice of tensor `t`; w13's gate and up concatenated along N."""
        lspec = spec.expert_linear(e)
        subs = zip(lspec.sub_prefixes, lspec.output_shards)
        parts = [self.expert_method.load_part(source, lspec, t, sub, shard) for sub, shard in subs]
        if any(p is None for p in parts):
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=t.out_axis or 0)

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        """Once, after load: repack into the kernel's layout, drop checkpoint-only tensors."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, group_counts: torch.Tensor, ops: TorchOps
    ) -> torch.Tensor:
        """x [M, K_local] with rows sorted by local expert, group_counts [E_local] -> [M, N_local]."""

    @abstractmethod
    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """The plain dequantized stacked weight [E_local, N_local, K_local]: the test oracle."""


class QuantConfig(ABC):
    """A checkpoint format: parses its own keys and picks a method per layer."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def detect(cls, model_path: str) -> QuantConfig | None:
        """Return a config if `model_path` is in this format, else None."""

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod: ...

    def moe_method(self, prefix: str, which: MoEWhich) -> MoEMethod:
        """The method for one stacked expert weight of the experts module `prefix` (mix-bits: w13 and w2
        are asked for separately and may differ)."""
        with_moe = sorted(n for n, c in _REGISTRY.items() if c.moe_method is not QuantConfig.moe_method)
        raise ValueError(
            f"quantization format {self.name!r} cannot load MoE expert weights ({prefix}, {which}); "
            f"formats with MoE support: {with_moe}"
        )


_REGISTRY: dict[str, type[QuantConfig]] = {}


def register(cls: type[QuantConfig]) -> type[QuantConfig]:
    if cls.name in _REGISTRY:
        raise ValueError(f"quantization format {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[QuantConfig]]:
    return dict(_REGISTRY)

