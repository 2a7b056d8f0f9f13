"""The Gemma 3 text decoder: scaled embeddings, sandwich norms, q/k norm, GELU-tanh MLP, local/global attention.

Checked against transformers' modeling_gemma3.py (Gemma3TextModel) and llama.cpp's gemma3 graph. Norm weights
are used as read: llama.cpp's converter stores gemma's (1 + weight) in the GGUF (convert_hf_to_gguf.py
Gemma3Model.modify_tensors; transformers' Gemma2TensorProcessor subtracts the 1 back when it loads one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.workers.device.base import AttentionMetadata, TorchOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.attention import Attention
from shardserve.workers.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shardserve.workers.layers.layernorm import RMSNorm
from shardserve.workers.layers.rotary import RotaryEmbedding
from shardserve.workers.loader.source import CheckpointSource
from shardserve.workers.models.config import ModelConfig
from shardserve.workers.models.llama import MLP, load_decoder_weights
from shardserve.workers.quant.base import QuantConfig


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Gemma3DecoderLayer(nn.Module):
    """x + post_attn_norm(attn(input_norm(x))), then h + post_ffw_norm(mlp(pre_ffw_norm(h)))."""

    def __init__(self, i: int, cfg: ModelConfig, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype):
        super().__init__()
        p, H, eps = f"model.layers.{i}", cfg.hidden_size, cfg.rms_norm_eps
        self.window = cfg.layer_window(i)
        self.self_attn = Attention(f"{p}.self_attn", cfg, quant, tp, ops, dtype, window=self.window)
        self.mlp = MLP(f"{p}.mlp", H, cfg.intermediate_size, quant, tp, ops, dtype, activation=_gelu_tanh)
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
        self.norms = nn.ModuleDict({n: RMSNorm(f"{p}.{n}.weight", H, eps, ops, dtype) for n in names})

    def load(self, source: CheckpointSource) -> None:
        for m in (self.self_attn, self.mlp, *self.norms.values()):
            m.load(source)

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        """x: the previous layer's output, residual: its input (None at layer 0) -> (output, residual)."""
        n = self.norms
        if residual is None:
            residual, x = x, n["input_layernorm"](x)
        else:
            x, residual = n["input_layernorm"](x, residual)  # residual += x
        x = n["post_attention_layernorm"](self.self_attn(x, cos_sin, kv_cache, meta))
        x, residual = n["pre_feedforward_layernorm"](x, residual)
        return n["post_feedforward_layernorm"](self.mlp(x, meta.is_prefill)), residual


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.tp, self.dtype = cfg, tp, dtype
        self.embed_tokens = VocabParallelEmbedding(
            "model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size, tp, dtype, quant, ops
        )
        # Gemma3TextScaledWordEmbedding: sqrt(hidden) rounded to the weight dtype
        self.embed_scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=dtype))
        self.layers = nn.ModuleList(Gemma3DecoderLayer(i, cfg, quant, tp, ops, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm("model.norm.weight", cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.lm_head = ParallelLMHead("lm_head.weight", cfg.vocab_size, cfg.hidden_size, tp, dtype, quant, ops)
        rot = cfg.rotary_dim or cfg.head_dim
        # global layers: rope_theta and the checkpoint's scaling; sliding layers: their own base, unscaled
        self.rotary = RotaryEmbedding(rot, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.rotary_local = RotaryEmbedding(rot, cfg.max_position, cfg.rope_local_theta or cfg.rope_theta, None)

    def load(self, source: CheckpointSource, progress=None) -> None:
        load_decoder_weights(self, source, progress)

    def kv_heads_local(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata):
        """ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(ids) * self.embed_scale  # [T, hidden]
        tables = {False: self.rotary.tables(positions), True: self.rotary_local.tables(positions)}
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, tables[layer.window is not None], kv, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> fp32 logits [S, vocab] on rank 0, None elsewhere; soft-capped where the config says."""
        logits = self.lm_head.logits(hidden)
        cap = self.cfg.final_logit_softcapping
        return logits if logits is None or not cap else torch.tanh(logits / cap) * cap
