"""ModelConfig: the architecture hyper-parameters every model file reads, from HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    architecture: str  # llama | qwen2 | qwen3 | qwen2_moe | qwen3_moe | gemma3
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rotary_dim: int | None = None  # None: the whole head_dim
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v
    qk_norm: bool = False  # qwen3: RMSNorm on q and k per head
    # MoE (zero experts = dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # gemma3 (transformers' Gemma3TextConfig names): attention scale query_pre_attn_scalar**-0.5 (None: head_dim),
    # a sliding window on the layers layer_types marks "sliding_attention", with its own rope base
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # empty: every layer "full_attention"
    rope_local_theta: float | None = None  # rope base of sliding layers (None: rope_theta)
    final_logit_softcapping: float | None = None
    # MoE experts partitioned across the TP group (rank r holds experts [r*E/tp, (r+1)*E/tp) whole)
    # instead of every expert's intermediate dim split; set by the engine, not read from checkpoints
    enable_expert_parallel: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a transformers config.json dict."""
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {arch!r} in config.json; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        heads = cfg["num_attention_heads"]
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0
        return cls(
            architecture=arch,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size", 0),
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=cfg.get("rope_scaling"),
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or arch == "qwen2_moe" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            num_experts=num_experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size", 0) or 0,
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=list(cfg.get("mlp_only_layers", []) or []),
        )

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, None for full attention."""
        sliding = i < len(self.layer_types) and self.layer_types[i] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        """Qwen-MoE rule (transformers' Qwen2MoeDecoderLayer): sparse unless listed or off the step."""
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moves rope_theta into rope_parameters
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


SUPPORTED_ARCHITECTURES = {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"}


def check_tp(cfg, tp_size: int, expert_parallel: bool = False) -> None:
    """Refuse a tp_size the model cannot be split by, before any worker starts; names the valid sizes."""
    def divisors(n: int) -> list[int]:
        return [d for d in range(1, n + 1) if n % d == 0]

    rules = [("num_attention_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)]
    if cfg.is_moe:
        rules.append(("num_experts", cfg.num_experts) if expert_parallel else ("moe_intermediate_size", cfg.moe_intermediate_size))
    for name, n in rules:
        if n and n % tp_size:
            raise ValueError(
                f"tp_size={tp_size} cannot split this {cfg.architecture} model: {name}={n} is not divisible by it; "
                f"valid tp sizes for {name}: {divisors(n)}"
            )
    kv = cfg.num_kv_heads
    if kv % tp_size and tp_size % kv:
        raise ValueError(f"tp_size={tp_size} and num_key_value_heads={kv}: one must divide the other")
