"""The quantization contract: a format registry, per-layer methods, tensor declarations and sharded loading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from torch import nn

Parallel = Literal["column", "row", "replicated"]


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
        """x [T, K_local] -> [T, N_local], without bias."""

    @abstractmethod
    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """The plain dequantized weight [N_local, K_local]: the test oracle."""


class QuantConfig(ABC):
    """A checkpoint format: parses its own keys and picks a method per layer."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def detect(cls, model_path: str) -> QuantConfig | None:
        """Return a config if `model_path` is in this format, else None."""

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod: ...


_REGISTRY: dict[str, type[QuantConfig]] = {}


def register(cls: type[QuantConfig]) -> type[QuantConfig]:
    if cls.name in _REGISTRY:
        raise ValueError(f"quantization format {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[QuantConfig]]:
    return dict(_REGISTRY)


DetectFn = Callable[[str], "QuantConfig | None"]
