"""The quantization contract: a format registry, per-layer methods and the one generic sharded loader.

The declarations (LinearSpec, TensorSpec, MoESpec, Shard) live in spec.py and are re-exported here. Methods are
stateless: whatever a method decides per layer at load (a packed layout, a kernel choice) is kept on the layer,
so that a format may hand one method instance to every layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.quant.spec import (
    Dim,
    LinearSpec,
    Merge,
    MoESpec,
    MoEWhich,
    Parallel,
    Shard,
    TensorSpec,
)

if TYPE_CHECKING:
    from shardserve.workers.device.base import TorchOps

__all__ = [
    "Dim", "LinearMethod", "LinearSpec", "Merge", "MoEMethod", "MoESpec", "MoEWhich", "Parallel", "QuantConfig",
    "Shard", "TensorSpec", "bias_spec", "read_tensor", "register", "registered",
]


def bias_spec(spec: LinearSpec) -> TensorSpec:
    """A linear's float bias, owned by its method: split with N (column-parallel), held by rank 0 only
    (row-parallel, so that the all-reduce adds it once), whole (replicated). Required when the model config says
    the layer has one, loaded whenever the checkpoint has one."""
    return TensorSpec("bias", ("N",), dtype=spec.dtype, optional=not spec.bias, rank0_only=True)


class LinearMethod(ABC):
    """How one linear layer's weights are declared, loaded, transformed and applied."""

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        return [TensorSpec("weight", dtype=spec.dtype), bias_spec(spec)]

    def load(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource) -> None:
        """Read this rank's slice of each declared tensor into a buffer of the layer named like the tensor."""
        for t in self.tensors(spec):
            self.load_tensor(layer, spec, source, t)

    def load_tensor(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource, t: TensorSpec) -> None:
        """One declared tensor; a format overrides this where a tensor's layout is irregular (GGUF blocks)."""
        value = read_tensor(source, spec, t, type(self).__name__)
        if value is not None:
            layer.register_buffer(t.name, value, persistent=False)

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        """Once, after load: repack into the kernel's layout, drop checkpoint-only tensors."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        """x [T, K_local] -> [T, N_local], bias included (where this rank holds it); the device's kernels are
        `layer.ops`, its op table. `is_prefill`: some sequence of the step feeds more than one token."""

    @abstractmethod
    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """The plain dequantized weight [N_local, K_local]."""

    def group_weight(self, layer: nn.Module):
        """The GroupWeight whose op-table product is all of apply but the bias (`layer.bias`), or None: what a
        table's fused decode path (TorchOps.fused_decoder) may multiply by in the layer's place."""
        return None

    def reference(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The test oracle for apply: x [T, K_local] -> [T, N_local] in plain fp32 torch. A scheme whose output
        depends on how activations are quantized (W8A8, W4A4, MX) overrides it to quantize x likewise."""
        y = F.linear(x.float(), self.reference_weight(layer).float())  # [T, N]
        return (y if layer.bias is None else y + layer.bias.float()).to(x.dtype)


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
        owner = type(self).__name__
        for t in self.tensors(spec):
            experts = [read_tensor(source, spec.expert_linear(e), t, owner) for e in spec.local_experts]
            missing = [e for e, x in zip(spec.local_experts, experts) if x is None]
            if len(missing) == len(experts):
                continue  # an optional tensor absent from the checkpoint
            if missing:
                name = f"{spec.expert_linear(missing[0]).sub_prefixes[0]}.{t.name}"
                message = f"missing for experts {missing} of {spec.prefix}, present for the others"
                raise CheckpointError(source.path, name, message)
            layer.register_buffer(t.name, torch.stack(experts), persistent=False)
        self._leave_to_other_ranks(spec, source)

    def _leave_to_other_ranks(self, spec: MoESpec, source: CheckpointSource) -> None:
        """Expert parallelism: the other ranks' experts are theirs to read, not tensors this rank left over."""
        local = set(spec.local_experts)
        for e in range(spec.num_experts):
            if e in local:
                continue
            for t in self.tensors(spec):
                names = (f"{sub}.{t.name}" for sub in spec.expert_linear(e).sub_prefixes)
                source.consumed.update(n for n in names if source.has(n))

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        """Once, after load: repack into the kernel's layout, drop checkpoint-only tensors."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, group_counts: torch.Tensor, ops: TorchOps, is_prefill: bool
    ) -> torch.Tensor:
        """x [M, K_local] with rows sorted by local expert, group_counts [E_local] -> [M, N_local], expert biases
        included; rows past sum(group_counts) are unspecified."""

    @abstractmethod
    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """The plain dequantized stacked weight [E_local, N_local, K_local]."""

    def reference(self, layer: nn.Module, x: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        """The test oracle for apply, one expert at a time in fp32: [M, K_local] -> [M, N_local], zeros past the
        grouped rows. Schemes that quantize activations override it, as LinearMethod.reference."""
        w = self.reference_weight(layer).float()  # [E, N, K]
        out = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.float32)  # [M, N]
        start = 0
        for e, count in enumerate(group_counts.tolist()):
            rows = slice(start, start + count)
            out[rows] = x[rows].float() @ w[e].T
            if layer.bias is not None:
                out[rows] += layer.bias[e].float()
            start += count
        return out.to(x.dtype)


class QuantConfig(ABC):
    """A checkpoint format: parses its own keys and picks a method per layer."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def detect(cls, model_path: str) -> QuantConfig | None:
        """Return a config if `model_path` is in this format, else None."""

    @abstractmethod
    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        """The method for one linear layer. A fused layer (qkv_proj, gate_up_proj) is several checkpoint modules,
        `spec.sub_prefixes`: a format that decides per checkpoint module asks `uniform_scheme`."""

    def moe_method(self, spec: MoESpec) -> MoEMethod:
        """The method for one stacked expert weight (mix-bits: w13 and w2 are asked for separately and may
        differ); `spec.modules` are its per-expert checkpoint modules."""
        with_moe = sorted(n for n, c in _REGISTRY.items() if c.moe_method is not QuantConfig.moe_method)
        raise ValueError(
            f"quantization format {self.name!r} cannot load MoE expert weights ({spec.prefix}, {spec.which}); "
            f"formats with MoE support: {with_moe}"
        )

    def bind(self, source: CheckpointSource) -> None:
        """Once, before the model is built: what the format checks or needs from the whole checkpoint (ModelSlim:
        its description names exactly the files' tensors; the tensors' shapes its methods declare by)."""

    def vocab_groups(self, source: CheckpointSource, name: str, start: int, length: int):
        """Rows [start, start + length) of the embedding or LM head `name` kept group-quantized (a
        gguf_groups.Groups: q, scale, zero per group along the hidden size), or None to read them as floats."""
        return None

    def scheme_of(self, module: str) -> Hashable:
        """The scheme this format gives one checkpoint module (ModelSlim: its description's label; GPTQModel:
        after its `dynamic` rules). Only formats that decide per module answer; they then use uniform_scheme."""
        raise NotImplementedError(f"quantization format {self.name!r} does not decide per checkpoint module")

    def uniform_scheme(self, layer: str, modules: Sequence[str]) -> Hashable:
        """The one scheme of every checkpoint module fused into `layer`; a ValueError naming each module's
        scheme when they differ (one fused layer runs one kernel)."""
        by_scheme: dict[Hashable, list[str]] = {}
        for m in modules:
            by_scheme.setdefault(self.scheme_of(m), []).append(m)
        if len(by_scheme) == 1:
            return next(iter(by_scheme))
        listing = "; ".join(f"{_first(ms)}: {s}" for s, ms in by_scheme.items())
        raise ValueError(
            f"quantization format {self.name!r}: {layer} fuses checkpoint modules of different schemes ({listing}); "
            f"a fused layer runs one scheme: quantize its modules alike"
        )


def _first(names: list[str], n: int = 4) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


_REGISTRY: dict[str, type[QuantConfig]] = {}


def register(cls: type[QuantConfig]) -> type[QuantConfig]:
    if cls.name in _REGISTRY:
        raise ValueError(f"quantization format {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[QuantConfig]]:
    return dict(_REGISTRY)


# ---- the generic loader: every sub-matrix's rank slice of one declared tensor, checked and merged ---------------
def read_tensor(source: CheckpointSource, spec: LinearSpec, t: TensorSpec, owner: str) -> torch.Tensor | None:
    """This rank's value of tensor `t` of layer `spec`, the sub-matrices merged by `t.merge`; None when an
    optional tensor is absent from every sub-matrix. `owner` (the method's name) goes into errors."""
    names = [f"{sub}.{t.name}" for sub in spec.sub_prefixes]
    present = [source.has(n) for n in names]
    if not any(present):
        if t.optional:
            return None
        raise CheckpointError(source.path, names[0], f"missing (needed by {owner} of {spec.prefix})")
    if not all(present):
        have = [n for n, p in zip(names, present) if p]
        lack = [n for n, p in zip(names, present) if not p]
        raise CheckpointError(
            source.file_of(have[0]), lack[0], f"missing, while {have} exist: the modules fused into {spec.prefix} must agree"
        )
    parts = [_read_part(source, spec, t, i, owner) for i in range(len(names))]
    return _merge(source, spec, t, names, parts)


def _read_part(source: CheckpointSource, spec: LinearSpec, t: TensorSpec, i: int, owner: str) -> torch.Tensor:
    """Sub-matrix i's rank slice of `t`, its stored shape checked against the declaration."""
    name, n = f"{spec.sub_prefixes[i]}.{t.name}", spec.output_sizes[i]
    full, found = t.full_shape(n, spec.input_size), tuple(source.shape(name))
    dim, start, length = _rank_slice(source, spec, t, name, i)
    # a read whole may drop or add size-1 axes ([1, H] stored [H], as GGUF does): the same values
    if found != full and (dim is not None or _squeeze(found) != _squeeze(full)):
        raise CheckpointError(
            source.file_of(name), name,
            f"expected shape {full} for {spec.prefix} (N={n}, K={spec.input_size}, as {owner} declares "
            f"{t.name} {t.dims}), found {found}; a padded or differently packed tensor is not this format's",
        )
    value = source.read(name, dim=dim, start=start, length=length)
    if t.dtype is not None and t.dtype.is_floating_point and not value.dtype.is_floating_point:
        raise CheckpointError(
            source.file_of(name), name,
            f"expected a float dtype for {spec.prefix} (as {owner} declares {t.name}), found {value.dtype}; "
            f"an integer tensor here is a quantized checkpoint this format does not read",
        )
    if dim is None:
        value = value.reshape(full)
    if t.rank0_only and not spec.first_k_slice:
        value = torch.zeros_like(value)  # another rank adds it; the all-reduce then counts it once
    value = value.contiguous()
    return value.to(t.dtype) if t.dtype is not None else value


def _rank_slice(
    source: CheckpointSource, spec: LinearSpec, t: TensorSpec, name: str, i: int
) -> tuple[int | None, int, int | None]:
    """(axis, start, length) in stored elements of this rank's slice, or (None, 0, None) to read it whole."""
    if spec.parallel == "column" and t.out_axis is not None:
        shard = spec.output_shards[i]
        return t.out_axis, *_whole_packs(source, spec, t, name, "N", spec.output_sizes[i], shard, t.out_pack)
    if spec.parallel == "row" and t.in_axis is not None:
        return t.in_axis, *_whole_packs(source, spec, t, name, "K", spec.input_size, spec.input_shard, t.in_pack)
    return None, 0, None


def _whole_packs(
    source: CheckpointSource, spec: LinearSpec, t: TensorSpec, name: str, axis: Dim, full: int, s: Shard, pack: int
) -> tuple[int, int]:
    """A rank slice in packs/groups of `pack` values: it must start and end on a boundary (or at the end)."""
    end = s.start + s.length
    if s.start % pack or (end % pack and end != full):
        valid = [1] + [tp for tp in range(2, 65) if full % tp == 0 and (full // tp) % pack == 0]
        raise CheckpointError(
            source.file_of(name), name,
            f"this rank's slice [{s.start}, {end}) of {axis}={full} of {spec.prefix} (tp_size {spec.tp_size}) "
            f"cuts {t.name}'s groups of {pack} {axis} values; tp sizes that keep whole groups: {valid}",
        )
    return s.start // pack, -(-end // pack) - s.start // pack


def _merge(
    source: CheckpointSource, spec: LinearSpec, t: TensorSpec, names: list[str], parts: list[torch.Tensor]
) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if t.merge == "cat":
        return torch.cat(parts, dim=t.out_axis)
    if t.merge == "max":
        return torch.stack(parts).amax(dim=0)
    if t.merge == "stack":
        return torch.stack(parts)
    for name, part in zip(names[1:], parts[1:]):
        if not torch.equal(part, parts[0]):
            shown = f": {parts[0].flatten()[:4].tolist()} vs {part.flatten()[:4].tolist()}"
            raise CheckpointError(
                source.file_of(name), name,
                f"differs from {names[0]}{shown}; {spec.prefix} fuses {names} and keeps one {t.name}, which must be "
                f"equal in each",
            )
    return parts[0]


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)
