"""The quant contract's declarations: what a layer tells its method (LinearSpec, MoESpec) and what a method reads
from the checkpoint (TensorSpec). Frozen dataclasses, so that one generic loader (base.py) shards every format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Parallel = Literal["column", "row", "replicated"]
MoEWhich = Literal["w13", "w2"]
# how the sub-matrices of a fused layer (qkv_proj, gate_up_proj) combine one declared tensor
Merge = Literal["cat", "same", "max", "stack"]
Dim = Literal["N", "K"] | int  # a tensor axis: along the output N, along the input K, or of a fixed size


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
    tp_rank: int = 0
    tp_size: int = 1
    # the model config says the layer has a bias: then the checkpoint must hold it. Without it a `.bias` the
    # checkpoint holds is loaded all the same (ModelSlim anti-outlier files add q/k/v biases the config lacks).
    bias: bool = False

    @property
    def local_out(self) -> int:
        return sum(s.length for s in self.output_shards)

    @property
    def local_in(self) -> int:
        return self.input_shard.length

    @property
    def first_k_slice(self) -> bool:
        """Whether this rank holds the tensors applied once over the K split (TensorSpec.rank0_only): the rank
        whose K slice starts at 0. Every rank of a column-parallel or replicated layer, tp rank 0 of a
        row-parallel one, and under expert parallelism every rank (each holds its experts' K whole)."""
        return self.input_shard.start == 0


@dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor of a quantized linear, declared once so one loader shards, merges and checks every format.

    `dims` names each axis of one sub-matrix's tensor as stored: "N" runs along the output, "K" along the input,
    an int is a fixed size. `out_pack`/`in_pack` are the values of N/K per element along that axis: a pack factor
    (int4 in int32: 8) or a group size (scales: G; a partial last group is a group of its own).
    """

    name: str  # suffix after the module prefix: weight, qweight, scales, weight_scale, ...
    dims: tuple[Dim, ...] = ("N", "K")
    out_pack: int = 1
    in_pack: int = 1
    dtype: torch.dtype | None = None  # cast on load; None keeps the stored dtype
    optional: bool = False
    # "cat": sub-matrices concatenated along N. "same": equal in every sub-matrix, one kept (per-tensor activation
    # scale/offset, act-order g_idx: q, k and v see one input). "max": the largest kept (static fp8 input scales).
    # "stack": each sub-matrix's value kept, stacked along a new first axis (compressed-tensors' weight_shape)
    merge: Merge = "cat"
    # applied once over the K split: held where LinearSpec.first_k_slice, zeros elsewhere, so that summing the
    # ranks' partial outputs counts it once (ModelSlim quant_bias, a row-parallel layer's bias)
    rank0_only: bool = False

    def __post_init__(self) -> None:
        if self.merge == "cat" and "N" not in self.dims:
            raise ValueError(f"TensorSpec {self.name!r} has no N axis to concatenate along: declare merge 'same' or 'max'")

    @property
    def out_axis(self) -> int | None:
        return self.dims.index("N") if "N" in self.dims else None

    @property
    def in_axis(self) -> int | None:
        return self.dims.index("K") if "K" in self.dims else None

    def full_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The stored shape of one sub-matrix's tensor, N = n and K = k (packs and groups rounded up)."""
        sizes = {"N": -(-n // self.out_pack), "K": -(-k // self.in_pack)}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


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
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def sub_names(self) -> tuple[str, ...]:
        """Per-expert checkpoint modules stacked along N (HF names)."""
        return ("gate_proj", "up_proj") if self.which == "w13" else ("down_proj",)

    @property
    def modules(self) -> tuple[str, ...]:
        """Every expert's checkpoint modules this one stacked weight is made of, all ranks' experts."""
        return tuple(f"{self.prefix}.{e}.{n}" for e in range(self.num_experts) for n in self.sub_names)

    @property
    def local_experts(self) -> range:
        return range(self.expert_shard.start, self.expert_shard.start + self.expert_shard.length)

    @property
    def local_shape(self) -> tuple[int, int, int]:
        """[E_local, N_local, K_local] of the stacked weight on this rank."""
        e, i, h = self.expert_shard.length, self.intermediate_shard.length, self.hidden_size
        return (e, 2 * i, h) if self.which == "w13" else (e, h, i)

    def expert_linear(self, e: int) -> LinearSpec:
        """Expert `e`'s checkpoint modules seen as one linear layer (w13: gate and up merged)."""
        subs = tuple(f"{self.prefix}.{e}.{n}" for n in self.sub_names)
        h, inter, s = self.hidden_size, self.intermediate_size, self.intermediate_shard
        tp = (self.tp_rank, self.tp_size)
        if self.which == "w13":
            name = f"{self.prefix}.{e}.gate_up_proj"
            return LinearSpec(name, subs, (inter, inter), (s, s), h, Shard(0, h), "column", self.dtype, *tp)
        return LinearSpec(subs[0], subs, (h,), (Shard(0, h),), inter, s, "row", self.dtype, *tp)
