"""The llama-family decoder (llama, qwen2, qwen3, and their MoE variants through the MoE layer)."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.workers.device.base import AttentionMetadata, DecodeLayerSpec, TorchOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.attention import Attention
from shardserve.workers.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shardserve.workers.layers.layernorm import RMSNorm
from shardserve.workers.layers.linear import column_parallel, row_parallel
from shardserve.workers.layers.rotary import RotaryEmbedding
from shardserve.workers.loader.source import CheckpointSource
from shardserve.workers.models.config import ModelConfig
from shardserve.workers.quant.base import QuantConfig


class MLP(nn.Module):
    """act(gate) * up, SwiGLU by default: gate/up merged column-parallel, down row-parallel."""

    def __init__(
        self, prefix: str, hidden: int, inter: int, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype,
        activation=torch.nn.functional.silu,
    ):
        super().__init__()
        self.activation = activation
        subs = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up = column_parallel(f"{prefix}.gate_up_proj", subs, hidden, [inter, inter], quant, tp, ops, dtype)
        self.down = row_parallel(f"{prefix}.down_proj", inter, hidden, quant, tp, ops, dtype)

    def load(self, source: CheckpointSource) -> None:
        self.gate_up.load(source)
        self.down.load(source)

    def forward(self, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        gate, up = self.gate_up(x, is_prefill).chunk(2, dim=-1)  # [T, I_local] each
        return self.down(self.activation(gate) * up, is_prefill)


class DecoderLayer(nn.Module):
    def __init__(self, i: int, cfg: ModelConfig, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype):
        super().__init__()
        p = f"model.layers.{i}"
        self.self_attn = Attention(f"{p}.self_attn", cfg, quant, tp, ops, dtype)
        if cfg.layer_is_moe(i):
            from shardserve.workers.layers.moe import SparseMoeBlock

            self.mlp = SparseMoeBlock(f"{p}.mlp", cfg, quant, tp, ops, dtype)
        else:
            self.mlp = MLP(f"{p}.mlp", cfg.hidden_size, cfg.intermediate_size, quant, tp, ops, dtype)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(f"{p}.input_layernorm.weight", cfg.hidden_size, eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(f"{p}.post_attention_layernorm.weight", cfg.hidden_size, eps, ops, dtype)

    def load(self, source: CheckpointSource) -> None:
        for m in (self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm):
            m.load(source)

    def decode_spec(self) -> DecodeLayerSpec | None:
        """This layer for a fused decode path, or None where its attention is not the plain shape the path computes
        (a norm with a bias, a weight without a GroupWeight, a row-parallel bias). An MLP the path does not compute
        (MoE, not SwiGLU) leaves gate_up and down None: the layer's own post-attention norm and MLP run it."""
        attn, mlp = self.self_attn, self.mlp
        norms = [self.input_layernorm] + [n for n in (attn.q_norm, attn.k_norm) if n is not None]
        qkv, o = (lin.method.group_weight(lin) for lin in (attn.qkv, attn.o_proj))
        if qkv is None or o is None or attn.o_proj.bias is not None:
            return None
        gate_up = down = None
        if isinstance(mlp, MLP) and mlp.activation is torch.nn.functional.silu and self._plain(mlp):
            gate_up, down = mlp.gate_up.method.group_weight(mlp.gate_up), mlp.down.method.group_weight(mlp.down)
            if gate_up is not None and down is not None:
                norms.append(self.post_attention_layernorm)
            else:
                gate_up = down = None
        eps = self.input_layernorm.eps
        if any(n.bias is not None or n.eps != eps for n in norms):
            return None
        return DecodeLayerSpec(
            hidden=self.input_layernorm.size, heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            inter=0 if down is None else mlp.down.spec.input_shard.length, eps=eps, scale=attn.scale,
            window=attn.window, input_norm=self.input_layernorm.weight,
            post_norm=None if down is None else self.post_attention_layernorm.weight,
            q_norm=None if attn.q_norm is None else attn.q_norm.weight,
            k_norm=None if attn.k_norm is None else attn.k_norm.weight,
            qkv_bias=attn.qkv.bias, qkv=qkv, o=o, gate_up=gate_up, down=down,
        )

    @staticmethod
    def _plain(mlp: MLP) -> bool:
        return mlp.gate_up.bias is None and mlp.down.bias is None

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos_sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, meta.is_prefill), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig, tp: TPGroup, ops: TorchOps, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.tp, self.dtype = cfg, tp, dtype
        self.embed_tokens = VocabParallelEmbedding(
            "model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size, tp, dtype, quant, ops
        )
        self.layers = nn.ModuleList(DecoderLayer(i, cfg, quant, tp, ops, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm("model.norm.weight", cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.lm_head = ParallelLMHead("lm_head.weight", cfg.vocab_size, cfg.hidden_size, tp, dtype, quant, ops)
        self.rotary: RotaryEmbedding | None = None
        self._decoder = None  # the op table's fused decode path for these layers (False: it has none), built at first use

    def load(self, source: CheckpointSource, progress=None) -> None:
        cfg = self.cfg
        freq_factors = getattr(source, "extra_tensors", {}).get("rope_freqs.weight")
        if freq_factors is not None:
            freq_factors = torch.from_numpy(freq_factors.data.copy()).float()
        self.rotary = RotaryEmbedding(
            cfg.rotary_dim or cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling, freq_factors
        )
        load_decoder_weights(self, source, progress)

    def kv_heads_local(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def _apply(self, fn, recurse=True):
        self._decoder = None  # it points at the tensors `.to()` replaces
        return super()._apply(fn, recurse)

    def fused_decoder(self):
        """The op table's fused decode path for every layer (TorchOps.fused_decoder), or None."""
        if self._decoder is None:
            specs = [layer.decode_spec() for layer in self.layers]
            ops = self.layers[0].self_attn.ops
            self._decoder = (None not in specs and ops.fused_decoder(specs)) or False
        return self._decoder or None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata):
        """ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(ids)
        cos_sin = self.rotary.tables(positions)
        decoder = self.fused_decoder() if meta.max_q == 1 else None
        fused = decoder.forward(x, cos_sin, kv_caches, meta, self.tp, self.layers) if decoder is not None else None
        if fused is not None:
            x, residual = fused
        else:
            residual = None
            for layer, kv in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, cos_sin, kv, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> fp32 logits [S, vocab] on rank 0, None elsewhere."""
        return self.lm_head.logits(hidden)


def load_decoder_weights(model: nn.Module, source: CheckpointSource, progress=None) -> None:
    """Embedding, layers (reporting each to `progress(done, total)`), final norm, then the LM head or its tie."""
    model.embed_tokens.load(source)
    for i, layer in enumerate(model.layers):
        layer.load(source)
        if progress:
            progress(i + 1, len(model.layers))
    model.norm.load(source)
    if model.cfg.tie_word_embeddings:
        model.lm_head.tie(model.embed_tokens)
    else:
        model.lm_head.load(source)
