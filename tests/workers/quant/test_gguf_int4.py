"""GGUF Q4_0 / Q4_1 kept 4-bit: block decoding vs gguf-py's dequantize, the CPU int4 kernel vs the plain-torch
reference, and TP slices of SmolLM2's layer 0 vs slices of the whole dequantized weight.

Tolerances: decoding is exact (same fp32 value as gguf-py). The CPU kernel rounds x, scales and zeros to bf16 and
its output to bf16 (unit roundoff u = 2^-8): against the reference fed the same bf16-rounded inputs it is within one
rounding of the output (|dy| <= u |y|); a layer's dequantized weight differs from gguf-py's only by the rounding of
d and m + 8d (|dw| <= (8 |d| + |m + 8d|) u per group).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from shardserve.workers.device.base import TorchOps, int4_dequantize
from shardserve.workers.device.cpu import CpuOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.linear import LinearBase, column_parallel, qkv_parallel, row_parallel
from shardserve.workers.loader.gguf_source import GGUFSource
from shardserve.workers.quant.gguf import GGUF, Q4_GROUP, GGUFLinearMethod, decode_q4

Q4_0, Q4_1, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
BF16_U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, rounding to nearest


class RefInt4Ops(TorchOps):
    """The plain-torch int4 layout (fp32 scales) switched on: the method's plumbing without the CPU kernel."""

    int4_kernel = True


TABLES = {"reference": RefInt4Ops(), "cpu": CpuOps(int4_kernel=True)}


def _weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with magnitudes over four decades and an offset, so Q4_1's m and d span many exponents."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * (10.0 ** rng.uniform(-4, 0, (n, 1))).astype(np.float32)
    return w + rng.uniform(-0.01, 0.01, (n, 1)).astype(np.float32)


# ---- decoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q4_0, Q4_1], ids=["Q4_0", "Q4_1"])
def test_decode_matches_gguf_py_dequantize(qtype):
    blocks = quantize(_weights(48, 256), qtype)  # [48, 8 * type_size] uint8
    q, sz = decode_q4(qtype, blocks)
    assert q.shape == (48, 256) and q.dtype == np.uint8 and q.max() <= 15
    assert sz.shape == (256 // Q4_GROUP, 48, 2)
    ours = int4_dequantize(torch.from_numpy(q), torch.from_numpy(sz), Q4_GROUP)
    assert torch.equal(ours, torch.from_numpy(dequantize(blocks, qtype)))


def test_decode_smollm2_blocks_matches_gguf_py(smollm2_path):
    source = GGUFSource(smollm2_path)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        blocks = source.read_quantized(name, None, 0, 0)
        q, sz = decode_q4(source.qtype(name), blocks)
        ours = int4_dequantize(torch.from_numpy(q), torch.from_numpy(sz), Q4_GROUP)
        assert torch.equal(ours, torch.from_numpy(dequantize(np.ascontiguousarray(blocks), source.qtype(name))))


# ---- the CPU kernel vs the reference ---------------------------------------------------------------------
@pytest.mark.parametrize("n,k,t", [(320, 576, 1), (576, 192, 5), (48, 96, 16)])
def test_cpu_int4_kernel_matches_reference(n, k, t):
    torch.manual_seed(0)
    q, sz = decode_q4(Q4_1, quantize(_weights(n, k), Q4_1))
    q, sz = torch.from_numpy(q), torch.from_numpy(sz)
    x = torch.randn(t, k)
    cpu, ref = CpuOps(int4_kernel=True), TorchOps()
    packed, sz_cpu = cpu.pack_int4(q, sz)
    assert sz_cpu.dtype == torch.bfloat16  # the kernel's layout, not the reference's
    assert torch.equal(cpu.unpack_int4(packed, sz_cpu, Q4_GROUP), q)  # packing loses nothing
    y = cpu.int4_group_matmul(x, packed, Q4_GROUP, sz_cpu)
    assert y.shape == (t, n) and y.dtype == x.dtype
    # same bf16-rounded inputs through the reference: only the kernel's bf16 output rounding remains
    ref_packed, _ = ref.pack_int4(q, sz)
    y_ref = ref.int4_group_matmul(x.bfloat16().float(), ref_packed, Q4_GROUP, sz_cpu.float())
    scale = y_ref.abs().amax(dim=-1, keepdim=True)  # [T, 1]
    assert ((y - y_ref).abs() <= BF16_U * y_ref.abs() + 1e-6 * scale).all()
    # and against the unrounded fp32 reference: bf16 inputs, scales and output
    y_exact = ref.int4_group_matmul(x, ref_packed, Q4_GROUP, sz)
    assert ((y - y_exact).abs() <= 2e-2 * scale).all()


def test_cpu_ops_fall_back_to_the_reference_where_the_kernel_does_not_fit():
    """N % 16 != 0, or the kernel not asked for: the reference layout, same numbers as TorchOps."""
    q, sz = decode_q4(Q4_0, quantize(_weights(40, 64), Q4_0))
    q, sz = torch.from_numpy(q), torch.from_numpy(sz)
    x = torch.randn(3, 64)
    expected = TorchOps().int4_group_matmul(x, TorchOps().pack_int4(q, sz)[0], Q4_GROUP, sz)
    for ops in (CpuOps(int4_kernel=True), CpuOps()):
        packed, sz_ops = ops.pack_int4(q, sz)
        assert sz_ops.dtype == torch.float32
        assert torch.equal(ops.unpack_int4(packed, sz_ops, Q4_GROUP), q)
        assert torch.equal(ops.int4_group_matmul(x, packed, Q4_GROUP, sz_ops), expected)


# ---- TP slices through the linear layers ---------------------------------------------------------------
def _layers(prefix: str, tp: TPGroup, ops: TorchOps, hidden: int, inter: int, heads: int, kv: int, d: int):
    quant = GGUF()
    return {
        "qkv": qkv_parallel(f"{prefix}.self_attn.qkv_proj", hidden, d, heads, kv, quant, tp, ops, torch.float32, False),
        "o_proj": row_parallel(f"{prefix}.self_attn.o_proj", heads * d, hidden, quant, tp, ops, torch.float32),
        "gate_up": column_parallel(
            f"{prefix}.mlp.gate_up_proj", [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], hidden, [inter, inter],
            quant, tp, ops, torch.float32,
        ),
        "down": row_parallel(f"{prefix}.mlp.down_proj", inter, hidden, quant, tp, ops, torch.float32),
    }


def _expected(source: GGUFSource, layer: LinearBase) -> torch.Tensor:
    """The rank's slice of the whole weight as gguf-py dequantizes it (GGUFSource.read of the full tensor)."""
    spec, parts = layer.spec, []
    for sub, shard in zip(spec.sub_prefixes, spec.output_shards):
        w = source.read(f"{sub}.weight")  # [N, K], HF row order
        if spec.parallel == "column":
            w = w[shard.start : shard.start + shard.length]
        parts.append(w[:, spec.input_shard.start : spec.input_shard.start + spec.input_shard.length])
    return torch.cat(parts)


def _bf16_bound(source: GGUFSource, layer: LinearBase) -> torch.Tensor:
    """Per element: the largest change rounding this rank's d and m + 8d to bf16 can make, (8|d| + |z|) u."""
    spec, parts = layer.spec, []
    for sub, shard in zip(spec.sub_prefixes, spec.output_shards):
        name = f"{sub}.weight"
        _, sz = decode_q4(source.qtype(name), source.read_quantized(name, None, 0, 0))  # [K/32, N, 2]
        bound = torch.from_numpy(8 * np.abs(sz[..., 0]) + np.abs(sz[..., 1])).T.repeat_interleave(Q4_GROUP, 1)
        if spec.parallel == "column":
            bound = bound[shard.start : shard.start + shard.length]
        parts.append(bound[:, spec.input_shard.start : spec.input_shard.start + spec.input_shard.length])
    return torch.cat(parts) * BF16_U


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_smollm2_layer0_tp3_slices(smollm2_path, rank, table):
    """SmolLM2: 9 heads, 3 KV heads, hidden 576, intermediate 1536; TP 3 splits o_proj's K into 192 (6 blocks)."""
    source, ops = GGUFSource(smollm2_path), TABLES[table]
    cfg = source.model_config
    layers = _layers("model.layers.0", TPGroup(rank, 3), ops, cfg.hidden_size, cfg.intermediate_size,
                     cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    torch.manual_seed(rank)
    for name, layer in layers.items():
        layer.load(source)
        assert layer.int4 and not hasattr(layer, "weight") and not hasattr(layer, "q"), name
        w = layer.method.reference_weight(layer)
        expected = _expected(source, layer)
        assert w.shape == expected.shape == (layer.spec.local_out, layer.spec.local_in), name
        if table == "reference":
            assert torch.equal(w, expected), name  # fp32 scales: gguf-py's values exactly
        else:
            assert ((w - expected).abs() <= _bf16_bound(source, layer)).all(), name
        x = torch.randn(4, layer.spec.local_in)
        y_ref = x @ w.T
        assert torch.allclose(layer.method.apply(layer, x, True), y_ref, rtol=2e-2, atol=2e-2 * y_ref.abs().max()), name


def test_int4_only_where_the_table_has_a_kernel(smollm2_path):
    """The default CPU table (kernel not asked for) keeps today's path: the float weight dequantized at load."""
    source = GGUFSource(smollm2_path)
    layer = row_parallel("model.layers.0.mlp.down_proj", 1536, 576, GGUF(), TPGroup(), CpuOps(), torch.float32)
    layer.load(source)
    assert not layer.int4 and not hasattr(layer, "qweight")
    assert torch.equal(layer.weight, source.read("model.layers.0.mlp.down_proj.weight"))


# ---- a file mixing types -------------------------------------------------------------------------------
def _mixed_gguf(path: str) -> str:
    """A one-layer llama GGUF: q Q4_0, k Q4_1, v Q8_0 (so qkv stays float), gate Q4_0 + up Q4_1 (merged int4)."""
    hidden, inter, heads, kv = 64, 128, 4, 2
    writer = GGUFWriter(path, "llama")
    for key, value in [("block_count", 1), ("embedding_length", hidden), ("feed_forward_length", inter),
                       ("attention.head_count", heads), ("attention.head_count_kv", kv), ("context_length", 64),
                       ("vocab_size", 32)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    shapes = {"attn_q": (Q4_0, hidden, hidden), "attn_k": (Q4_1, hidden // 2, hidden), "attn_v": (Q8_0, hidden // 2, hidden),
              "attn_output": (Q4_0, hidden, hidden), "ffn_gate": (Q4_0, inter, hidden), "ffn_up": (Q4_1, inter, hidden),
              "ffn_down": (Q4_1, hidden, inter)}
    for i, (name, (qtype, n, k)) in enumerate(shapes.items()):
        writer.add_tensor(f"blk.0.{name}.weight", quantize(_weights(n, k, seed=i), qtype), raw_dtype=qtype)
    writer.add_tensor("token_embd.weight", _weights(32, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("rank", [0, 1])
def test_mixed_q4_types_merge_and_other_types_stay_float(tmp_path, rank):
    source = GGUFSource(_mixed_gguf(os.path.join(tmp_path, "mixed.gguf")))
    cfg = source.model_config
    layers = _layers("model.layers.0", TPGroup(rank, 2), RefInt4Ops(), cfg.hidden_size, cfg.intermediate_size,
                     cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    for name, layer in layers.items():
        layer.load(source)
        assert layer.int4 == (name != "qkv"), name
        assert torch.equal(layer.method.reference_weight(layer), _expected(source, layer)), name


@pytest.mark.parametrize("table", list(TABLES))
def test_one_method_instance_serves_float_and_int4_layers(tmp_path, table):
    """Methods keep no per-layer state: one GGUFLinearMethod for a float qkv (Q8_0 v) and int4 layers, in either
    load order, and each layer's apply matches its reference (the dequantized weight's matmul)."""
    source = GGUFSource(_mixed_gguf(os.path.join(tmp_path, "mixed.gguf")))
    cfg = source.model_config
    method = GGUFLinearMethod()
    for order in (["qkv", "gate_up", "o_proj", "down"], ["down", "gate_up", "o_proj", "qkv"]):
        layers = _layers("model.layers.0", TPGroup(), TABLES[table], cfg.hidden_size, cfg.intermediate_size,
                         cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        for name in order:
            layers[name].method = method
            layers[name].load(source)
        assert vars(method) == {}
        torch.manual_seed(0)
        for name, layer in layers.items():
            assert layer.int4 == (name != "qkv"), name
            x = torch.randn(3, layer.spec.local_in)
            y, y_ref = method.apply(layer, x, False), method.reference(layer, x)
            torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2 * y_ref.abs().max().item())
