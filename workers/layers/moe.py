"""The sparse MoE block (qwen2_moe, qwen3_moe): router, top-k, sorted dispatch, grouped and shared experts.

Data path per step (T tokens, k experts each, E experts, I intermediate per expert):
router [T, E] -> top-k [T, k] -> moe_init_routing (rows sorted by expert) [T*k, H] -> w13 grouped matmul
[T*k, 2I] -> swiglu [T*k, I] -> w2 grouped matmul [T*k, H] -> moe_finalize_routing (un-sort, weight, add
the gated shared expert) [T, H] -> one all-reduce.

Parallelism over the TP group: by default every expert's I is split across ranks (w13 column-, w2
row-parallel, like the dense MLP); with `ModelConfig.enable_expert_parallel` rank r holds experts
[r*E/tp, (r+1)*E/tp) whole and rows routed elsewhere contribute zero. Either way each rank returns a
partial sum and the block all-reduces once, shared expert included.
"""

from __future__ import annotations

import torch
from torch import nn

from shardserve.workers.device.base import TorchOps
from shardserve.workers.distributed import TPGroup, divide
from shardserve.workers.layers.linear import LinearBase, column_parallel, replicated, row_parallel
from shardserve.workers.loader.source import CheckpointSource
from shardserve.workers.models.config import ModelConfig
from shardserve.workers.quant.base import MoEMethod, MoESpec, QuantConfig, Shard
from shardserve.workers.quant.unquantized import Unquantized

# the router and the shared-expert gate stay float in every producer's files (vLLM builds them with no
# quant config; llama.cpp's quantizer skips ffn_gate_inp)
_FLOAT = Unquantized()


class GroupedExperts(nn.Module):
    """One stacked expert weight (w13 or w2) of this rank; its quant method holds the tensors."""

    def __init__(self, spec: MoESpec, quant: QuantConfig, ops: TorchOps):
        super().__init__()
        self.spec, self.ops = spec, ops
        self.method: MoEMethod = quant.moe_method(spec)
        self.register_buffer("bias", None, persistent=False)  # [E_local, N_local] when the checkpoint has one

    def load(self, source: CheckpointSource) -> None:
        self.method.load(self, self.spec, source)
        self.method.after_load(self, self.spec)

    def forward(self, x: torch.Tensor, group_counts: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        return self.method.apply(self, x, group_counts, self.ops, is_prefill)  # [M, K_local] -> [M, N_local]


class SharedExpert(nn.Module):
    """qwen2_moe's always-on expert: SwiGLU split like the dense MLP, scaled by sigmoid(shared_expert_gate).

    Returns this rank's partial sum; the MoE block reduces it together with the routed experts."""

    def __init__(
        self, prefix: str, hidden: int, inter: int, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype
    ):
        super().__init__()
        p = f"{prefix}.shared_expert"
        subs = [f"{p}.gate_proj", f"{p}.up_proj"]
        self.gate_up = column_parallel(f"{p}.gate_up_proj", subs, hidden, [inter, inter], quant, tp, ops, dtype)
        self.down = row_parallel(f"{p}.down_proj", inter, hidden, quant, tp, ops, dtype)
        self.gate = replicated(f"{prefix}.shared_expert_gate", hidden, 1, _FLOAT, ops, dtype)
        self.ops = ops

    def load(self, source: CheckpointSource) -> None:
        for m in (self.gate_up, self.down, self.gate):
            m.load(source)

    def forward(self, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        h = self.ops.swiglu(self.gate_up(x, is_prefill))  # [T, I_shared_local]
        partial = _partial(self.down, h, is_prefill)  # [T, H], summed over ranks by the block's all-reduce
        return torch.sigmoid(self.gate(x, is_prefill)) * partial  # [T, 1] * [T, H]


class SparseMoeBlock(nn.Module):
    """Routed experts (+ the shared expert when the config has one) of one decoder layer: [T, H] -> [T, H]."""

    def __init__(self, prefix: str, cfg: ModelConfig, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype):
        super().__init__()
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.tp, self.ops, self.num_experts = tp, ops, E
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = replicated(f"{prefix}.gate", H, E, _FLOAT, ops, dtype)
        if cfg.enable_expert_parallel:
            n = divide(E, tp.size, "num_experts (expert parallel)")
            experts, rows = Shard(tp.rank * n, n), Shard(0, inter)
        else:
            n = divide(inter, tp.size, "moe_intermediate_size")
            experts, rows = Shard(0, E), Shard(tp.rank * n, n)
        self.experts = experts
        self.w13, self.w2 = (
            GroupedExperts(
                MoESpec(f"{prefix}.experts", which, E, experts, H, inter, rows, dtype, tp.rank, tp.size), quant, ops
            )
            for which in ("w13", "w2")
        )
        shared = cfg.shared_expert_intermediate_size
        self.shared = SharedExpert(prefix, H, shared, quant, tp, ops, dtype) if shared else None

    def load(self, source: CheckpointSource) -> None:
        for m in (self.gate, self.w13, self.w2, self.shared):
            if m is not None:
                m.load(source)

    def route(self, x: torch.Tensor, is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> top-k weights [T, k] (x's dtype) and expert ids [T, k]; softmax in fp32 as HF does."""
        probs = torch.softmax(self.gate(x, is_prefill).float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        """x [T, H] -> [T, H]; `is_prefill`: some sequence of the step feeds more than one token."""
        weights, ids = self.route(x, is_prefill)  # [T, k]
        local = self.experts
        groups = local.length
        if local.length < self.num_experts:  # expert parallel: other ranks' experts go to a last, idle group
            ids = ids - local.start
            ids = torch.where((ids >= 0) & (ids < local.length), ids, local.length)  # [T, k] in [0, E_local]
            groups += 1
        xs, row_idx, counts = self.ops.moe_init_routing(x, ids, groups)  # [T*k, H], [T*k], [groups]
        counts = counts[: local.length]  # [E_local]
        h = self.ops.swiglu(self.w13(xs, counts, is_prefill))  # [T*k, 2 * I_local] -> [T*k, I_local]
        y = self.w2(h, counts, is_prefill)  # [T*k, H]
        if groups > local.length:  # rows of the unused group are not this rank's: they contribute zero
            valid = torch.arange(y.shape[0], device=y.device) < counts.sum()  # [T*k]
            y = y.masked_fill(~valid.unsqueeze(-1), 0.0)
        shared = self.shared(x, is_prefill) if self.shared is not None else None  # [T, H] partial
        out = self.ops.moe_finalize_routing(y, weights, row_idx, shared)  # [T, H] partial
        return self.tp.all_reduce(out)


def _partial(linear: LinearBase, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
    """A row-parallel linear's un-reduced output (its bias on rank 0 only): the MoE block reduces once for all
    its parts."""
    return linear.method.apply(linear, x, is_prefill)
