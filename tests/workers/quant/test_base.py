"""The quant contract's generic loader and format hooks, on small safetensors files written here and read back
through SafetensorsSource: per-module schemes of fused layers, merge rules, declared shapes, group-aligned TP
slices, and a tensor applied once over the K split (ModelSlim W8A8's quant_bias).

Tolerances: loads are exact; the toy W8A8's rank sum vs TP=1 differs by fp32 summation order only (1e-5).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from shardserve.workers.device.base import TorchOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.linear import column_parallel, qkv_parallel, replicated, row_parallel
from shardserve.workers.layers.moe import GroupedExperts
from shardserve.workers.loader.safetensors_source import SafetensorsSource
from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.quant.base import (
    LinearMethod,
    LinearSpec,
    MoESpec,
    QuantConfig,
    Shard,
    TensorSpec,
    bias_spec,
)
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod

OPS = TorchOps()
P = "model.layers.0"
HIDDEN, HEADS, KV, D = 64, 4, 2, 16  # q N=64, k and v N=32


def _source(tmp_path, tensors: dict[str, torch.Tensor]) -> SafetensorsSource:
    os.makedirs(tmp_path, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, os.path.join(tmp_path, "model.safetensors"))
    return SafetensorsSource(str(tmp_path))


def _qkv_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"{P}.self_attn.{m}.weight": torch.randn(n, HIDDEN) for m, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))}


class Declared(UnquantizedLinearMethod):
    """The float weight and bias plus `extra` declarations (or only `only`): the generic loader under test."""

    def __init__(self, *extra: TensorSpec, only: bool = False):
        self.extra, self.only = list(extra), only

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        return self.extra if self.only else super().tensors(spec) + self.extra


class With(QuantConfig):
    """A format handing every layer one given method; not registered (the registry rejects duplicates)."""

    name = "test-with"

    def __init__(self, method: LinearMethod):
        self.method = method

    @classmethod
    def detect(cls, model_path: str) -> None:
        return None

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        return self.method


def _qkv(quant: QuantConfig):
    return qkv_parallel(f"{P}.self_attn.qkv_proj", HIDDEN, D, HEADS, KV, quant, TPGroup(), OPS, torch.float32, False)


# ---- 1. a format deciding per checkpoint module sees the fused layer's modules ----------------------------
class PerModule(QuantConfig):
    """A toy format with a scheme per checkpoint module, as ModelSlim's description or GPTQModel's `dynamic` rules
    give one; every other module FLOAT."""

    name = "test-per-module"

    def __init__(self, schemes: dict[str, str]):
        self.schemes = schemes

    @classmethod
    def detect(cls, model_path: str) -> None:
        return None

    def scheme_of(self, module: str) -> str:
        return self.schemes.get(module, "FLOAT")

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        assert self.uniform_scheme(spec.prefix, spec.sub_prefixes) in ("W8A8", "FLOAT")
        return UnquantizedLinearMethod()

    def moe_method(self, spec: MoESpec) -> UnquantizedMoEMethod:
        self.uniform_scheme(spec.prefix, spec.modules)
        return UnquantizedMoEMethod()


def test_fused_layer_is_asked_by_its_checkpoint_modules():
    attn = f"{P}.self_attn"
    same = PerModule({f"{attn}.{m}": "W8A8" for m in ("q_proj", "k_proj", "v_proj")})
    assert _qkv(same).spec.sub_prefixes == (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    mixed = PerModule({f"{attn}.q_proj": "W8A8", f"{attn}.k_proj": "W8A8", f"{attn}.v_proj": "W8A8_DYNAMIC"})
    with pytest.raises(ValueError, match=rf"qkv_proj fuses .*{attn}\.q_proj, {attn}\.k_proj: W8A8; "
                                         rf"{attn}\.v_proj: W8A8_DYNAMIC"):
        _qkv(mixed)
    mlp = f"{P}.mlp"
    with pytest.raises(ValueError, match=rf"{mlp}\.gate_proj: FLOAT; {mlp}\.up_proj: W8A8"):
        column_parallel(f"{mlp}.gate_up_proj", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], HIDDEN, [128, 128],
                        PerModule({f"{mlp}.up_proj": "W8A8"}), TPGroup(), OPS, torch.float32)


def test_moe_method_is_asked_with_every_expert_module():
    experts = f"{P}.mlp.experts"
    spec = MoESpec(experts, "w13", 8, Shard(0, 8), HIDDEN, 32, Shard(0, 32), torch.float32)
    GroupedExperts(spec, PerModule({}), OPS)  # all FLOAT
    with pytest.raises(ValueError, match=rf"{experts}\.0\.gate_proj, .* \(\+11 more\): FLOAT; {experts}\.5\.up_proj: W4A8"):
        GroupedExperts(spec, PerModule({f"{experts}.5.up_proj": "W4A8"}), OPS)


# ---- 2. merge rules ---------------------------------------------------------------------------------------
def test_same_keeps_one_per_tensor_scale_and_refuses_unequal_ones(tmp_path):
    scale = TensorSpec("input_scale", (1,), merge="same")
    tensors = _qkv_weights() | {f"{P}.self_attn.{m}.input_scale": torch.tensor([0.03]) for m in ("q_proj", "k_proj", "v_proj")}
    layer = _qkv(With(Declared(scale)))
    layer.load(_source(tmp_path / "a", tensors))
    assert torch.equal(layer.input_scale, torch.tensor([0.03]))  # one, not [3]
    assert layer.weight.shape == (128, HIDDEN)  # the weight still concatenated along N
    tensors[f"{P}.self_attn.v_proj.input_scale"] = torch.tensor([0.05])
    with pytest.raises(CheckpointError, match=r"v_proj\.input_scale'.*differs from .*q_proj\.input_scale"):
        _qkv(With(Declared(scale))).load(_source(tmp_path / "b", tensors))


def test_a_tensor_without_an_n_axis_states_its_merge():
    spec_max = TensorSpec("input_scale", (1,), merge="max")
    assert spec_max.out_axis is None and spec_max.full_shape(64, 32) == (1,)
    with pytest.raises(ValueError, match="no N axis"):
        TensorSpec("input_scale", (1,))  # "cat" needs an N axis: every declared tensor states its merge


def test_max_merge_loads(tmp_path):
    tensors = _qkv_weights() | {
        f"{P}.self_attn.{m}.input_scale": torch.tensor([s]) for m, s in (("q_proj", 0.2), ("k_proj", 0.5), ("v_proj", 0.1))
    }
    layer = _qkv(With(Declared(TensorSpec("input_scale", (1,), merge="max"))))
    layer.load(_source(tmp_path, tensors))
    assert torch.equal(layer.input_scale, torch.tensor([0.5]))


def test_g_idx_is_loaded_once_and_sliced_with_k(tmp_path):
    """act-order g_idx [K], indexed by K only: one for the fused layer (q, k, v see one input), split with K."""
    g_idx = TensorSpec("g_idx", ("K",), merge="same", dtype=torch.int32)
    perm = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.int32) // 16
    tensors = _qkv_weights() | {f"{P}.self_attn.{m}.g_idx": perm for m in ("q_proj", "k_proj", "v_proj")}
    tensors[f"{P}.self_attn.o_proj.weight"] = torch.randn(HIDDEN, HIDDEN)
    tensors[f"{P}.self_attn.o_proj.g_idx"] = perm
    source = _source(tmp_path, tensors)
    qkv = _qkv(With(Declared(g_idx)))
    qkv.load(source)
    assert torch.equal(qkv.g_idx, perm)  # [K], not [3K]
    o_proj = row_parallel(f"{P}.self_attn.o_proj", HIDDEN, HIDDEN, With(Declared(g_idx)), TPGroup(1, 2), OPS, torch.float32)
    o_proj.load(source)
    assert torch.equal(o_proj.g_idx, perm[32:])
    assert source.unconsumed() == []


# ---- 4. declared shapes and group-aligned row slices -----------------------------------------------------
def _gptq_like(group: int) -> list[TensorSpec]:
    """GPTQ's qweight [K/8, N] int32 (8 int4 along K) and scales [ceil(K/G), N] (formats.md)."""
    return [TensorSpec("qweight", ("K", "N"), in_pack=8), TensorSpec("scales", ("K", "N"), in_pack=group)]


def test_padded_qweight_is_refused_naming_file_tensor_and_shapes(tmp_path):
    """auto-round's model-free RTN pads K = 576 up to 640 in qweight (80 int32 rows) while scales keep 5 groups."""
    name = f"{P}.mlp.gate_proj"
    padded = {f"{name}.qweight": torch.zeros(80, 64, dtype=torch.int32), f"{name}.scales": torch.ones(5, 64)}
    source = _source(tmp_path, padded)
    layer = column_parallel(f"{P}.mlp.gate_up", [name], 576, [64], With(Declared(*_gptq_like(128), only=True)),
                            TPGroup(), OPS, torch.float32)
    file = os.path.join(tmp_path, "model.safetensors")
    expected = rf"{file}: tensor '{name}\.qweight'.*expected shape \(72, 64\).*found \(80, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        layer.load(source)


@pytest.mark.parametrize("k,tp,rank,valid", [(576, 2, 0, [1]), (576, 2, 1, [1]), (512, 8, 1, [1, 2, 4])])
def test_row_slice_inside_a_group_is_refused(tmp_path, k: int, tp: int, rank: int, valid: list[int]):
    """K = 576 with groups of 128 cannot be cut in two (288 ends inside group 2): refuse, name the sizes that work."""
    name = f"{P}.mlp.down_proj"
    groups = -(-k // 128)
    tensors = {f"{name}.qweight": torch.zeros(k // 8, 64, dtype=torch.int32), f"{name}.scales": torch.ones(groups, 64)}
    source = _source(tmp_path, tensors)
    quant = With(Declared(*_gptq_like(128), only=True))
    layer = row_parallel(name, k, 64, quant, TPGroup(rank, tp), OPS, torch.float32)
    message = rf"'{name}\.scales'.*slice \[\d+, \d+\) of K={k}.*groups of 128.*{re.escape(str(valid))}"
    with pytest.raises(CheckpointError, match=message):
        layer.load(source)


def test_aligned_row_slices_read_their_groups(tmp_path):
    name = f"{P}.mlp.down_proj"
    scales = torch.arange(4 * 64, dtype=torch.float32).view(4, 64)  # K = 512, 4 groups of 128
    source = _source(tmp_path, {f"{name}.qweight": torch.zeros(64, 64, dtype=torch.int32), f"{name}.scales": scales})
    layer = row_parallel(name, 512, 64, With(Declared(*_gptq_like(128), only=True)), TPGroup(1, 2), OPS, torch.float32)
    layer.load(source)
    assert layer.qweight.shape == (32, 64) and torch.equal(layer.scales, scales[2:])


def test_a_whole_read_may_drop_a_size_one_axis(tmp_path):
    """qwen2_moe's shared_expert_gate is [1, H] in HF files and [H] in GGUF ones: the same values."""
    name = f"{P}.mlp.shared_expert_gate"
    gate = replicated(name, HIDDEN, 1, With(UnquantizedLinearMethod()), OPS, torch.float32)
    gate.load(_source(tmp_path, {f"{name}.weight": torch.randn(HIDDEN)}))
    assert gate.weight.shape == (1, HIDDEN)


# ---- 3 and 7. a tensor applied once over the K split; an oracle that quantizes activations -----------------
class ToyW8A8(LinearMethod):
    """ModelSlim W8A8 static as formats-modelslim.md gives it: y = deq_scale * (x_q @ w^T + quant_bias), x_q the
    per-tensor asymmetric int8 activation. The float `.bias` is folded into quant_bias: read, then dropped."""

    def tensors(self, spec: LinearSpec) -> list[TensorSpec]:
        return [
            TensorSpec("weight", dtype=torch.int8),
            TensorSpec("input_scale", (1,), merge="same"),
            TensorSpec("input_offset", (1,), merge="same"),
            TensorSpec("deq_scale", ("N",)),
            TensorSpec("quant_bias", ("N",), rank0_only=True),
            bias_spec(spec),
        ]

    def after_load(self, layer, spec: LinearSpec) -> None:
        layer.bias = None  # already inside quant_bias: adding it again double-counts it

    def apply(self, layer, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        x_q = layer.ops.static_quant(x, layer.input_scale, layer.input_offset)
        return layer.ops.quant_matmul(x_q, layer.weight, layer.deq_scale, bias=layer.quant_bias, out_dtype=x.dtype)

    def reference_weight(self, layer) -> torch.Tensor:
        return layer.weight.float() * (layer.deq_scale / layer.input_scale).unsqueeze(-1)  # weight_scale per row

    def reference(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The activation quantized as the producer's fake-quant does (fp32), the matmul in float64."""
        x_q = torch.round(x.float() / layer.input_scale + layer.input_offset).clamp(-128, 127).double()  # [T, K]
        acc = x_q @ layer.weight.double().T + layer.quant_bias.double()  # [T, N], integers
        return (layer.deq_scale.double() * acc).to(x.dtype)


def _w8a8_checkpoint(name: str, n: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{name}.weight": torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g),
        f"{name}.input_scale": torch.tensor([0.03]),
        f"{name}.input_offset": torch.tensor([-6.0]),
        f"{name}.deq_scale": torch.rand(n, generator=g) * 1e-3,
        f"{name}.quant_bias": torch.randint(-5000, 5000, (n,), dtype=torch.int32, generator=g),
        f"{name}.bias": torch.randn(n, generator=g),  # labelled FLOAT, already folded
    }


def test_w8a8_quant_bias_counted_once_over_tp2(tmp_path):
    name, n, k = f"{P}.self_attn.o_proj", 32, 64
    source = _source(tmp_path, _w8a8_checkpoint(name, n, k))
    quant = With(ToyW8A8())
    full = row_parallel(name, k, n, quant, TPGroup(), OPS, torch.float32)
    full.load(source)
    assert full.bias is None and source.unconsumed() == []
    x = torch.randn(7, k) * 2
    y = full.method.apply(full, x, False)
    torch.testing.assert_close(y, full.method.reference(full, x), rtol=1e-5, atol=1e-5)
    ranks = [row_parallel(name, k, n, quant, TPGroup(r, 2), OPS, torch.float32) for r in range(2)]
    for layer in ranks:
        layer.load(source)
    assert torch.equal(ranks[0].quant_bias, full.quant_bias) and not ranks[1].quant_bias.any()
    partial = sum(layer.method.apply(layer, x[:, r * 32 : (r + 1) * 32], False) for r, layer in enumerate(ranks))
    torch.testing.assert_close(partial, y, rtol=1e-5, atol=1e-5)
