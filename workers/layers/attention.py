"""Attention over the paged KV cache: this rank's heads, GQA, rotary, optional per-head q/k norm (qwen3, gemma3),
optional sliding window (gemma3's local layers)."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.workers.device.base import AttentionMetadata, TorchOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.layernorm import RMSNorm
from shardserve.workers.layers.linear import qkv_parallel, row_parallel
from shardserve.workers.loader.source import CheckpointSource
from shardserve.workers.models.config import ModelConfig
from shardserve.workers.quant.base import QuantConfig


class Attention(nn.Module):
    """`window`: keys older than the last `window` are masked (None: full causal attention)."""

    def __init__(
        self, prefix: str, cfg: ModelConfig, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype,
        window: int | None = None,
    ):
        super().__init__()
        D = cfg.head_dim
        self.qkv = qkv_parallel(
            f"{prefix}.qkv_proj", cfg.hidden_size, D, cfg.num_heads, cfg.num_kv_heads, quant, tp, ops, dtype,
            cfg.attention_bias,
        )
        self.o_proj = row_parallel(f"{prefix}.o_proj", cfg.num_heads * D, cfg.hidden_size, quant, tp, ops, dtype)
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = self.qkv.spec.output_shards[1].length // D
        self.head_dim, self.ops, self.window = D, ops, window
        self.scale = (cfg.query_pre_attn_scalar or D) ** -0.5
        self.q_norm = RMSNorm(f"{prefix}.q_norm.weight", D, cfg.rms_norm_eps, ops, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(f"{prefix}.k_norm.weight", D, cfg.rms_norm_eps, ops, dtype) if cfg.qk_norm else None

    def load(self, source: CheckpointSource) -> None:
        for m in (self.qkv, self.o_proj, self.q_norm, self.k_norm):
            if m is not None:
                m.load(source)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        sizes = [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D]
        q, k, v = self.qkv(x, meta.is_prefill).split(sizes, dim=-1)
        q, k, v = q.view(T, -1, D), k.view(T, -1, D), v.view(T, -1, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rotary(q, k, *cos_sin)
        self.ops.write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = self.ops.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, self.window)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.num_heads * D), meta.is_prefill)
