"""The test oracle for ModelSlim checkpoints: HF transformers' model with every quantized Linear replaced by a module
that simulates the label's arithmetic from the checkpoint's own tensors, written from formats-modelslim.md section 2
without shardserve's code (its unpacking, decoding and formulas are this file's own).

Integer sums are taken in float64 (exact); activations are quantized in float32 per the page's rules. FLOAT tensors
(embeddings, norms and their anti-outlier biases, the router, lm_head) are loaded as they are. HF transformers 5
holds an MoE layer's experts as fused 3-D parameters: they are replaced by per-expert modules with HF's forward
signature, so HF's own router and top-k choose the experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

QMAX = {"W8A8_DYNAMIC": 127, "W8A8_MIX": 127, "W4A8_DYNAMIC": 127, "W4A4_DYNAMIC": 7}
META = {"version", "model_quant_type", "group_size", "metadata", "optional", "kv_cache_type", "kv_quant_type",
        "fa_quant_type", "reduce_quant_type"}


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def description(path: Path) -> dict:
    files = sorted(path.glob("quant_model_description*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _unpack_n(packed: torch.Tensor) -> torch.Tensor:
    """[N/2, K] bytes: low nibble row 2j, high nibble row 2j+1, two's complement -> [N, K]."""
    u = packed.view(torch.uint8).to(torch.int32)
    low, high = u & 15, u >> 4
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    n2, k = packed.shape
    out = torch.empty(2 * n2, k, dtype=torch.int32)
    out[0::2], out[1::2] = low, high
    return out


def _per_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """A scale [N, 1] or [N, G] spread over the K columns it covers -> [N, K] float64."""
    t = t.double()
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    g = -(-k // t.shape[-1])
    return t.repeat_interleave(g, dim=-1)[:, :k]


class FakeQuantLinear(nn.Module):
    """One Linear of label `label` computing from the checkpoint's tensors `t` (suffix -> tensor)."""

    def __init__(self, label: str, t: dict[str, torch.Tensor], packed_n: bool, decode: bool = False):
        super().__init__()
        self.label, self.t, self.decode = label, t, decode
        self.splits = 1  # K slices quantized apart (a row-parallel layer under TP)
        w = t["weight"]
        if label == "W4A8_DYNAMIC" and packed_n:
            w = _unpack_n(w)
        if label in ("W4A4_MXFP4", "W4A8_MXFP"):
            w = _unpack_fp4_k(w)
        self.k = w.shape[1]
        self.w = w.double() if not w.dtype.is_floating_point or w.dtype.itemsize > 1 else w.float().double()
        if label == "W4A8_DYNAMIC" and "weight_scale_second" in t:
            self.w = (self.w - _per_k(t["weight_offset_second"], self.k)) * _per_k(t["weight_scale_second"], self.k)
        self.bias = t.get("bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        y = self._matmul(x)
        return y.to(torch.float32).reshape(*shape[:-1], -1)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        t, label = self.t, self.label
        static = label == "W8A8" or (label == "W8A8_MIX" and self.decode)
        if static:
            s, o = t["input_scale"].float(), t["input_offset"].float()
            x_q = torch.clamp(torch.round(x / s + o), -128, 127).double()
            ds = t["deq_scale"]
            ds = ds.to(torch.int32).view(torch.float32) if ds.dtype == torch.int64 else ds.float()
            return (x_q @ self.w.T + t["quant_bias"].double()) * ds.double()  # the float .bias is inside quant_bias
        if label in QMAX or label == "WFP8AFP8_DYNAMIC":
            offset = _per_k(t["weight_offset"], self.k) if label in QMAX else 0.0
            y = self._per_token(x, (self.w - offset) * _per_k(t["weight_scale"], self.k), QMAX.get(label))
        elif label == "W8A16":
            w = (self.w - _per_k(t["weight_offset"], self.k)) * _per_k(t["weight_scale"], self.k)
            y = x.double() @ w.T
        elif label == "W8A8_MXFP8":
            w = self.w * torch.exp2(_per_k(t["weight_scale"].to(torch.int32), self.k) - 127)
            y = _mx_fp8(x) @ w.T
        elif label in ("W4A4_MXFP4", "W4A8_MXFP"):
            w = self.w * torch.exp2(_per_k(t["weight_scale"].to(torch.int32), self.k) - 127)
            y = (_mx_fp4(x) if label == "W4A4_MXFP4" else _mx_fp8(x)) @ w.T
        else:
            raise NotImplementedError(label)
        return y if self.bias is None else y + self.bias.double()


    def _per_token(self, x: torch.Tensor, w: torch.Tensor, qmax: int | None) -> torch.Tensor:
        """Dynamic per-token activations (int with `qmax`, else fp8 e4m3: max / 448) times the effective weight w
        [N, K]; with `splits` > 1 each of that many equal K slices is quantized on its own and the partial sums
        added, as TP ranks of a row-parallel layer do."""
        y = 0.0
        for cols in torch.arange(self.k).chunk(self.splits):
            xs = x[:, cols]
            if qmax is None:
                s_x = xs.abs().amax(-1, keepdim=True) / 448.0
                x_q = (xs / s_x.clamp_min(1e-30)).to(torch.float8_e4m3fn).double()
            else:
                s_x = xs.abs().amax(-1, keepdim=True) / qmax
                x_q = torch.clamp(torch.round(xs / s_x.clamp_min(1e-30)), -qmax - 1, qmax).double()
            y = y + (x_q @ w[:, cols].T) * s_x.double()
        return y


def _mx_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per 32 along K: e = floor(log2 amax) - 8, x_q = fp8_e4m3(x / 2^e) -> float64 x_q 2^e."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    e = torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - 8
    q = (xb / torch.exp2(e)).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    return (q * torch.exp2(e).double()).reshape(m, k)


# the 16 FP4 E2M1 codes, sign bit 3 (msmodelslim save/utils/pack.py pack_fp4_to_uint8)
_FP4 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)


def _unpack_fp4_k(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes, element 2i in the low nibble -> float64 [N, K]."""
    u = packed.view(torch.uint8).long()
    n, half = u.shape
    out = torch.empty(n, 2 * half, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = _FP4[u & 15], _FP4[u >> 4]
    return out


def _mx_fp4(x: torch.Tensor) -> torch.Tensor:
    """msmodelslim's MXFP4 fake-quant per 32 along K (calculate_mxfp4_qparam, mxfp4_quantize) -> float64."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32).double()
    amax = xb.abs().amax(-1, keepdim=True)
    shared = torch.clip(torch.floor(torch.log2(amax / (1 - 0.5**3) + 9.6e-7)) - 2, -129, 125)
    mag = xb.abs() / 2.0**shared
    private = torch.clip(torch.floor(torch.log2(mag + 9.6e-7)), 0, 2)
    q = torch.clip(torch.floor(mag / 2.0**private * 2 + 0.5) / 2 * 2.0**private, max=6.0)
    q = torch.where(shared < -127, 0.0, q)
    return (torch.sign(xb) * q * 2.0**shared).reshape(m, k)


class RefExperts(nn.Module):
    """HF transformers 5's experts interface (hidden [T, H], top-k ids and weights [T, k]) over per-expert modules."""

    def __init__(self, experts: list[tuple[nn.Module, nn.Module, nn.Module]], act):
        super().__init__()
        self.experts, self.act = experts, act

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, (gate, up, down) in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            h = hidden[token]
            y = down(self.act(gate(h)) * up(h))
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class BiasedNorm(nn.Module):
    def __init__(self, norm: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.norm, self.bias = norm, bias

    def forward(self, x):
        return self.norm(x) + self.bias.to(x.dtype)


def reference_model(path: Path, decode: bool = False, tp: int = 1, ep: bool = False) -> nn.Module:
    """The oracle for the ModelSlim directory `path` (fp32 compute); `decode`: W8A8_MIX runs its static formula;
    `tp` > 1: the row-parallel Linears (o_proj, down_proj; not the routed experts under `ep`, which hold their K
    whole) quantize their dynamic activations per K slice of a rank."""
    desc, tensors = description(path), load_tensors(path)
    labels = {k: v for k, v in desc.items() if k not in META}
    packed_n = "version" in desc
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    modules = {n.removesuffix(".weight") for n, label in labels.items() if n.endswith(".weight") and label != "FLOAT"}

    def linear(module: str) -> nn.Module:
        label = labels[f"{module}.weight"]
        t = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".") and "." not in k[len(module) + 1:]}
        if label == "FLOAT":
            lin = nn.Linear(t["weight"].shape[1], t["weight"].shape[0], bias="bias" in t)
            lin.weight.data = t["weight"].float()
            if "bias" in t:
                lin.bias.data = t["bias"].float()
            return lin
        lin = FakeQuantLinear(label, t, packed_n, decode)
        if module.endswith(("o_proj", "down_proj")) and not (ep and ".experts." in module):
            lin.splits = tp
        return lin

    floats = {n: tensors[n].float() for n, _ in model.named_parameters() if labels.get(n) == "FLOAT" and n in tensors}
    missing = model.load_state_dict(floats, strict=False).missing_keys
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("Experts"):
            prefix = name
            n = cfg.num_experts
            experts = [tuple(linear(f"{prefix}.{e}.{p}") for p in ("gate_proj", "up_proj", "down_proj")) for e in range(n)]
            _set(model, name, RefExperts(experts, mod.act_fn))
        elif isinstance(mod, nn.Linear) and name in modules:
            _set(model, name, linear(name))
        elif isinstance(mod, nn.Linear) and f"{name}.bias" in tensors and mod.bias is None:
            _set(model, name, linear(name))  # FLOAT q/k/v with the anti-outlier bias the HF config lacks
        elif f"{name}.bias" in tensors and hasattr(mod, "variance_epsilon"):
            _set(model, name, BiasedNorm(mod, tensors[f"{name}.bias"].float()))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    unexplained = [k for k in missing if not any(k.startswith(m + ".") for m in modules) and ".experts." not in k
                   and k != "lm_head.weight"]
    assert not unexplained, f"reference left parameters unloaded: {unexplained[:5]}"
    return model


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def reference_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()
