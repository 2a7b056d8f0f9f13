"""The test oracle for GPTQ, AWQ, AutoRound and compressed-tensors checkpoints: HF transformers on the producer's own
dequantized weights (the fixture scripts' `dequantized(row)` directories), with the dynamic per-token int8 activation
quantization re-applied where the checkpoint quantizes activations (W8A8, W4A8: llm-compressor's dequantize path
drops it). Written without shardserve's code.

HF transformers 5 holds an MoE layer's experts fused (3-D parameters); where the dequantized files store them per
expert they are loaded into per-expert Linears (modelslim_reference.RefExperts), so HF's own router picks them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tests.workers.quant.modelslim_reference import RefExperts, _set, load_tensors, reference_logits  # noqa: F401


class ActQuantLinear(nn.Module):
    """y = fake_quant(x) W^T + b: x quantized per token, symmetric int8 (s = max|x| / 127, round half to even, clamp
    [-128, 127]); `splits` > 1: per K slice, as each TP rank of a row-parallel layer quantizes its own slice."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, splits: int = 1):
        super().__init__()
        self.weight, self.bias, self.splits = weight.float(), None if bias is None else bias.float(), splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.float().chunk(self.splits, dim=-1)
        xq = torch.cat([_fake_quant(p) for p in parts], dim=-1)
        y = xq.double() @ self.weight.double().T
        return (y if self.bias is None else y + self.bias.double()).float()


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(x / s).clamp(-128, 127) * s


def activation_quantized_modules(quantized: Path) -> set[str]:
    """Modules whose activations the checkpoint quantizes: compressed-tensors groups with input_activations (their
    int-quantized modules carry an int8 `weight` beside `weight_scale`)."""
    qcfg = json.loads((quantized / "config.json").read_text()).get("quantization_config", {})
    groups = qcfg.get("config_groups") or {}
    if not any(g.get("input_activations") for g in groups.values()):
        return set()
    tensors = load_tensors(quantized)
    return {n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale")
            and tensors.get(n.replace(".weight_scale", ".weight"), torch.empty(0)).dtype == torch.int8}


def reference_model(dequantized: Path, act_quant: set[str] = frozenset(), tp: int = 1, ep: bool = False) -> nn.Module:
    cfg = AutoConfig.from_pretrained(dequantized)
    tensors = {k: v.float() for k, v in load_tensors(dequantized).items()}
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    def linear(module: str) -> nn.Module:
        w, b = tensors[f"{module}.weight"], tensors.get(f"{module}.bias")
        if module in act_quant:
            row_parallel = module.endswith(("o_proj", "down_proj")) and not (ep and ".experts." in module)
            return ActQuantLinear(w, b, tp if row_parallel else 1)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight.data = w
        if b is not None:
            lin.bias.data = b
        return lin

    own = dict(model.named_parameters())
    missing = model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False).missing_keys
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("Experts") and f"{name}.0.gate_proj.weight" in tensors:
            n = getattr(cfg, "num_experts", None) or cfg.num_local_experts
            experts = [tuple(linear(f"{name}.{e}.{p}") for p in ("gate_proj", "up_proj", "down_proj")) for e in range(n)]
            _set(model, name, RefExperts(experts, mod.act_fn))
        elif isinstance(mod, nn.Linear) and name in act_quant:
            _set(model, name, linear(name))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    unexplained = [k for k in missing if ".experts." not in k and k != "lm_head.weight"]
    assert not unexplained, f"reference left parameters unloaded: {unexplained[:5]}"
    return model
