"""Parallel linear layers: column (split N), row (split K, all-reduce), merged gate/up and QKV."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.workers.device.base import TorchOps
from shardserve.workers.distributed import TPGroup, divide
from shardserve.workers.loader.source import CheckpointSource
from shardserve.workers.quant.base import LinearMethod, LinearSpec, Parallel, QuantConfig, Shard


class LinearBase(nn.Module):
    """A linear layer whose tensors (bias included) are its quant method's: the method declares, loads and applies
    them, so that a format decides how a bias is stored (ModelSlim W8A8 folds it into `quant_bias`).

    `ops`, the device's op table, is the layer's so that its method can reach the device's kernels.
    """

    def __init__(self, spec: LinearSpec, quant: QuantConfig, tp: TPGroup, ops: TorchOps):
        super().__init__()
        self.spec = spec
        self.tp, self.ops = tp, ops
        self.method: LinearMethod = quant.linear_method(spec)
        self.register_buffer("bias", None, persistent=False)  # [N_local] once loaded; a buffer so .to() moves it

    def load(self, source: CheckpointSource) -> None:
        self.method.load(self, self.spec, source)
        self.method.after_load(self, self.spec)

    def forward(self, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        y = self.method.apply(self, x, is_prefill)  # a row-parallel bias is on rank 0 only: reduced once
        return self.tp.all_reduce(y) if self.spec.parallel == "row" else y


def _spec(
    prefix: str,
    subs: list[str],
    sizes: list[int],
    shards: list[Shard],
    k: int,
    k_shard: Shard,
    parallel: Parallel,
    dtype: torch.dtype,
    tp: TPGroup,
    bias: bool,
) -> LinearSpec:
    """`bias`: the model config says the layer has one (a hint: the method loads a bias the checkpoint holds)."""
    return LinearSpec(prefix, tuple(subs), tuple(sizes), tuple(shards), k, k_shard, parallel, dtype, tp.rank, tp.size, bias)


def column_parallel(
    prefix: str, subs: list[str], k: int, sizes: list[int], quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype,
    bias=False,
) -> LinearBase:
    """N split evenly per sub-matrix (merged gate/up when len(subs) > 1)."""
    shards = [Shard(tp.rank * divide(n, tp.size, f"{s}.out"), n // tp.size) for s, n in zip(subs, sizes)]
    return LinearBase(_spec(prefix, subs, sizes, shards, k, Shard(0, k), "column", dtype, tp, bias), quant, tp, ops)


def row_parallel(
    prefix: str, k: int, n: int, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype, bias=False
) -> LinearBase:
    """K split evenly; partial sums all-reduced (a bias is held by rank 0 only, so it is added once)."""
    kl = divide(k, tp.size, f"{prefix}.in")
    spec = _spec(prefix, [prefix], [n], [Shard(0, n)], k, Shard(tp.rank * kl, kl), "row", dtype, tp, bias)
    return LinearBase(spec, quant, tp, ops)


def replicated(prefix: str, k: int, n: int, quant: QuantConfig, ops: TorchOps, dtype, bias=False) -> LinearBase:
    spec = _spec(prefix, [prefix], [n], [Shard(0, n)], k, Shard(0, k), "replicated", dtype, TPGroup(), bias)
    return LinearBase(spec, quant, TPGroup(), ops)


def qkv_parallel(
    prefix: str,
    hidden: int,
    head_dim: int,
    heads: int,
    kv_heads: int,
    quant: QuantConfig,
    tp: TPGroup,
    ops: TorchOps,
    dtype,
    bias,
) -> LinearBase:
    """Q heads split across ranks; KV heads split too, or replicated when fewer than ranks (GQA)."""
    hq = divide(heads, tp.size, "num_attention_heads")
    if kv_heads >= tp.size:
        hkv, kv_first = divide(kv_heads, tp.size, "num_key_value_heads"), tp.rank * (kv_heads // tp.size)
    else:
        divide(tp.size, kv_heads, "tp_size over num_key_value_heads")
        hkv, kv_first = 1, tp.rank * kv_heads // tp.size
    base = prefix.rsplit(".", 1)[0]
    subs = [f"{base}.q_proj", f"{base}.k_proj", f"{base}.v_proj"]
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    kv = Shard(kv_first * head_dim, hkv * head_dim)
    shards = [Shard(tp.rank * hq * head_dim, hq * head_dim), kv, kv]
    spec = _spec(prefix, subs, sizes, shards, hidden, Shard(0, hidden), "column", dtype, tp, bias)
    return LinearBase(spec, quant, tp, ops)
