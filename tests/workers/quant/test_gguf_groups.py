"""GGUF kept quantized: block decoding vs gguf-py's dequantize for every integer type, each op table's layout vs
the decoded values, group_matmul vs a float matmul of what the layout holds, and real SmolLM2 layers under TP.

Tolerances, per element (u = 2^-8, bf16's unit roundoff):
- decode, the reference layout ("groups", TorchOps: CUDA's and the fallback everywhere) and the CPU's "gq" layout
  (cpu_gq.py, our kernel): exact, bit for bit. gq's matmul holds x per 32 values along K as d xq, xq int16
  (d = amax / 32767): |dy| <= sum_k |w_k| d_k / 2, plus float32 rounding.
- CPU ATen layouts (ATen int4, bf16 scales and zeros): |dw| <= u ((|q| + 32) |scale| + |zero|), the rounding of
  scale, 16 scale and zero + (lo + 8) scale to bf16 (cpu.CpuOps docstring); its matmul additionally rounds x and
  the output to bf16: |dy| <= 2u (|x| @ |w|.T) + u |y|.
Random blocks are random bytes with the fp16 (or E8M0) scale fields set to finite values: every bit pattern of
the integer fields is a valid block, so this covers all values the types can hold.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from shardserve.workers.device.base import TorchOps
from shardserve.workers.device.cpu import CpuOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.linear import LinearBase, column_parallel, qkv_parallel, row_parallel
from shardserve.workers.loader.gguf_source import GGUFSource
from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.quant.gguf import GGUF
from shardserve.workers.quant.gguf_groups import decodable, decode

U = 2.0**-8
TABLES = {"reference": TorchOps(), "cpu": CpuOps(kernel="gq"), "cpu-aten": CpuOps(kernel="aten")}
# byte offsets of each type's fp16 scale fields in its block (ggml-common.h)
FP16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82], T.Q3_K: [108],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0], T.TQ1_0: [52], T.TQ2_0: [64],
}
TABLE_TYPES = [*FP16_FIELDS, T.MXFP4, T.NVFP4]
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0, T.MXFP4]  # gguf-py's own quantizers


def random_blocks(qtype: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, k / block * type_size] uint8: random integer fields, finite scales over three decades, both signs."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n * (k // block), size), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, []):
        d = (rng.choice([-1, 1], b.shape[0]) * 10.0 ** rng.uniform(-4, -1, b.shape[0])).astype(np.float16)
        b[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    if qtype == T.MXFP4:
        b[:, 0] = rng.integers(110, 130, b.shape[0])
    return b.reshape(n, -1)


def _weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with magnitudes over four decades and an offset, so scales and zeros span many exponents."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * (10.0 ** rng.uniform(-4, 0, (n, 1))).astype(np.float32)
    return w + rng.uniform(-0.01, 0.01, (n, 1)).astype(np.float32)


def _k(qtype: T) -> int:
    return 512 if GGML_QUANT_SIZES[qtype][0] >= 256 else 256


# ---- decoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TABLE_TYPES, ids=lambda t: t.name)
def test_decode_random_blocks_matches_gguf_py_exactly(qtype):
    blocks = random_blocks(qtype, 32, _k(qtype))
    g = decode(qtype, blocks)
    assert decodable(qtype) and g is not None
    assert g.q.dtype == np.int8 and g.q.shape == (32, _k(qtype)) and g.scale.shape == (32, _k(qtype) // g.group)
    assert np.array_equal(g.dequantize(), dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_decode_quantized_weights_matches_gguf_py_exactly(qtype):
    blocks = quantize(_weights(48, 512), qtype)
    assert np.array_equal(decode(qtype, blocks).dequantize(), dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.IQ2_XXS, T.IQ3_S, T.IQ1_M], ids=lambda t: t.name)
def test_float_and_grid_types_are_not_decoded(qtype):
    assert not decodable(qtype)


# Q4_K's d and Q4_1's m (integers read from their fields), Q5_K's d (integers recovered from gguf-py's values)
@pytest.mark.parametrize("qtype, offset", [(T.Q4_K, 0), (T.Q4_1, 2), (T.Q5_K, 0)], ids=["Q4_K-d", "Q4_1-m", "Q5_K-d"])
def test_a_nan_scale_is_refused_naming_the_type_and_block(qtype, offset):
    blocks = random_blocks(qtype, 4, 256)
    per_row = blocks.shape[1] // GGML_QUANT_SIZES[qtype][1]
    blocks.reshape(4 * per_row, -1)[per_row + 1, offset : offset + 2] = np.array([np.nan], np.float16).view(np.uint8)
    with pytest.raises(ValueError, match=f"{qtype.name}: block {per_row + 1} "):
        decode(qtype, blocks)


# ---- op table layouts ----------------------------------------------------------------------------------
def _pieces(qtype: T, n: int, k: int, seed: int = 0):
    g = decode(qtype, random_blocks(qtype, n, k, seed))
    zero = None if g.zero is None else torch.from_numpy(g.zero)
    return torch.from_numpy(g.q), torch.from_numpy(g.scale), zero, g.group, torch.from_numpy(g.dequantize())


EXACT_LAYOUTS = ("groups", "gq")


def _matmul_bound(x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, layout: str) -> torch.Tensor:
    """|y - x @ w.T| allowed for a layout's group_matmul (the module docstring's tolerances)."""
    fp32 = 1e-5 * F.linear(x.abs(), w.abs()) + 1e-6
    if layout == "groups":
        return fp32
    if layout == "gq":  # x held as d xq per 32, xq int16, d = amax / 32767: |dx_k| <= d / 2
        d = x.abs().view(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1) / (2 * 32767)
        return F.linear(d, w.abs()) * (1 + 1e-3) + fp32
    return 2 * U * F.linear(x.abs(), w.abs()) + U * y_ref.abs() + 1e-6


def _cpu_bound(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    s = scale.abs().repeat_interleave(group, -1)
    z = 0 if zero is None else zero.abs().repeat_interleave(group, -1)
    return U * ((q.float().abs() + 32) * s + z) * (1 + 1e-5)


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("qtype", TABLE_TYPES, ids=lambda t: t.name)
def test_layout_holds_the_checkpoint_values(table, qtype):
    ops = TABLES[table]
    q, scale, zero, group, w = _pieces(qtype, 64, _k(qtype))
    packed = ops.pack_groups(q, scale, zero, group)
    held = ops.group_dequantize(packed)
    if packed.layout in EXACT_LAYOUTS:
        assert torch.equal(held, w)
    else:
        assert table == "cpu-aten" and packed.layout in ("int4pack", "int4pack2")
        assert ((held - w).abs() <= _cpu_bound(q, scale, zero, group)).all()
    lookup = ops.pack_groups(q, scale, zero, group, lookup=True)
    ids = torch.tensor([5, 0, 63, 5])
    assert lookup.layout == ("groups" if table == "reference" else packed.layout)  # CPU: rows from the kernel's
    assert torch.equal(ops.group_rows(lookup, ids), w[ids])


# K-quants, 5/8-bit and 4-bit types; rows: one block of 16, full blocks of 32/64 with a partial one (48 = 32 + 16,
# 80 = 64 + 16), 1040 (one conversion, a partial tail) and 2048 (converted 1024 rows at a time)
# gq takes every type; ATen's nibbles not groups of 16 (Q6_K: the reference layout, test_cpu_aten_layouts_by_type)
ROW_CASES = [("cpu", t) for t in (T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_K, T.Q6_K, T.Q8_0, T.TQ2_0)] + [
    ("cpu-aten", t) for t in (T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_K, T.Q8_0, T.TQ2_0)
]


@pytest.mark.parametrize(("table", "qtype"), ROW_CASES, ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("n", [16, 48, 80, 1040, 2048])
def test_cpu_rows_read_from_the_kernel_layout_are_gguf_py_values(table, qtype, n):
    """One copy for a tied embedding and head: group_rows reads the kernel's layout (gq, or the ATen int4 nibbles of
    int4mm_kernel.cpp's packing) with exact scales; every row must equal gguf-py's dequantize bit for bit, and the
    tied weight's matmul must be the head's own (pack_groups(lookup=False)) bit for bit."""
    ops = TABLES[table]
    k = _k(qtype)
    blocks = random_blocks(qtype, n, k, seed=n)
    g = decode(qtype, blocks)
    q, scale = torch.from_numpy(g.q), torch.from_numpy(g.scale)
    zero = None if g.zero is None else torch.from_numpy(g.zero)
    lookup = ops.pack_groups(q, scale, zero, g.group, lookup=True)
    assert lookup.layout in (("gq",) if table == "cpu" else ("int4pack", "int4pack2")) and not hasattr(lookup, "q")
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    gguf_py = torch.from_numpy(dequantize(blocks, qtype)).reshape(n, k)
    assert torch.equal(ops.group_rows(lookup, ids), gguf_py[ids])
    assert torch.equal(ops.group_dequantize(lookup), gguf_py)  # untied, the effective weight is the rows
    head = ops.pack_groups(q, scale, zero, g.group)
    tied = ops.tie_groups(lookup)
    assert tied is lookup and tied.layout == head.layout
    x = torch.randn(3, k)
    assert torch.equal(ops.group_matmul(x, tied), ops.group_matmul(x, head))
    assert torch.equal(ops.group_dequantize(tied), ops.group_dequantize(head))


@pytest.mark.parametrize("layout", [(64, True), (32, True), (32, False), (16, False)])
def test_nibble_gather_reads_each_builds_packing(layout):
    """The builds this machine cannot run (AVX512, the scalar build, NEON): weight_to_int4pack_kernel's loops
    (int4mm_kernel.cpp), transcribed element by element, against the vectorised index arithmetic of group_rows."""
    from shardserve.workers.device.cpu import _gather_nibbles

    block_n, lanes = layout
    n, k = 176, 64  # full blocks and a partial one under every BLOCK_N
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = torch.zeros(n * k // 2, dtype=torch.uint8)
    for b in range(-(-n // block_n)):
        nb, src, dst = min(block_n, n - b * block_n), u[b * block_n :], b * k * block_n // 2
        for kk in range(k):
            if lanes and nb == block_n:
                half = block_n // 2
                for d in range(half):
                    packed[dst + kk * half + d] = src[d + half, kk] << 4 | src[d, kk]
            else:
                for r in range(0, nb, 2):
                    packed[dst + kk * nb // 2 + r // 2] = src[r + 1, kk] << 4 | src[r, kk]
    assert torch.equal(_gather_nibbles(packed.view(n, k // 2), torch.arange(n), k, layout), u)


def test_cpu_rows_under_the_scalar_build_are_exact():
    """ATEN_CPU_CAPABILITY=default packs pairwise (no lanes): the probe must find that and rows stay exact."""
    script = (
        "import torch; from shardserve.workers.device import cpu; from shardserve.workers.device.cpu import CpuOps\n"
        "q = torch.randint(-128, 128, (80, 64), dtype=torch.int8); s = torch.rand(80, 2)\n"
        "w = CpuOps(kernel='aten').pack_groups(q, s, None, 32, lookup=True); ids = torch.arange(80)\n"
        "ref = (q.float().view(80, 2, 32) * s[..., None]).view(80, 64)\n"
        "print(torch.backends.cpu.get_cpu_capability(), cpu._nibble_layout(), w.layout,"
        " torch.equal(CpuOps(kernel='aten').group_rows(w, ids), ref))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["DEFAULT", "(32,", "False)", "int4pack2", "True"], out


def test_cpu_gq_holds_each_type_at_its_width():
    """gq: every integer type, at 4, 5, 6 or 8 bits a value (its span of integers), scales float16 where exact."""
    ops = TABLES["cpu"]
    packed = {t.name: ops.pack_groups(*_pieces(t, 64, _k(t))[:4]) for t in TABLE_TYPES}
    assert {p.layout for p in packed.values()} == {"gq"}
    bits = {name: p.bits for name, p in packed.items()}
    assert bits == {
        "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 4, "Q3_K": 4, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6,
        "IQ4_NL": 8, "IQ4_XS": 8, "TQ1_0": 4, "TQ2_0": 4, "MXFP4": 5, "NVFP4": 5,
    }
    assert packed["Q4_0"].scale.dtype == packed["Q5_0"].scale.dtype == packed["Q8_0"].scale.dtype == torch.float16
    q5 = packed["Q5_0"]  # 5 bits: nibbles and one bit plane, 0.69 bytes a value (the file's 22 bytes per 32)
    held = sum(t.numel() * t.element_size() for t in q5.buffers())
    assert held == 64 * _k(T.Q5_0) * 22 // 32


def test_cpu_aten_layouts_by_type():
    """int4 values (Q4_*, TQ*) one kernel call; int8 values two; groups of 16 the reference."""
    ops = TABLES["cpu-aten"]
    layouts = {t.name: ops.pack_groups(*_pieces(t, 64, _k(t))[:4]).layout for t in TABLE_TYPES}
    assert layouts["Q4_0"] == layouts["Q4_1"] == layouts["Q4_K"] == layouts["TQ2_0"] == "int4pack"
    assert layouts["Q8_0"] == layouts["Q5_K"] == layouts["IQ4_XS"] == layouts["MXFP4"] == "int4pack2"
    assert layouts["Q6_K"] == layouts["Q2_K"] == layouts["Q3_K"] == layouts["NVFP4"] == "groups"


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 7, 13])  # 13: a tile of 8 activation rows and one of 5 (gq.c)
def test_group_matmul_matches_a_matmul_of_the_held_weight(table, qtype, rows):
    ops = TABLES[table]
    q, scale, zero, group, _ = _pieces(qtype, 96, 512, seed=rows)
    packed = ops.pack_groups(q, scale, zero, group)
    x = torch.randn(rows, 512)
    w = ops.group_dequantize(packed)
    y_ref = F.linear(x, w)
    y = ops.group_matmul(x, packed)
    assert y.shape == (rows, 96) and y.dtype == x.dtype
    assert ((y - y_ref).abs() <= _matmul_bound(x, w, y_ref, packed.layout)).all()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_gq_one_row_equals_that_row_in_a_batch(qtype):
    """gq.c sums a row's products in one order at any batch size (tiles of 8, 4, 2 or 1 activation rows, their
    integer sums split over 1, 2 or 4 registers: the same integers), so a lone activation row's product equals the
    same row's inside a batch bit for bit. 97 weight rows: six blocks of 16 and one padded block of a row; 15
    activation rows: tiles of 8, 4, 2 and 1."""
    from shardserve.workers.device import cpu_gq

    q, scale, zero, group, _ = _pieces(qtype, 97, _k(qtype), seed=4)
    packed = cpu_gq.pack(q, scale, zero, group)
    x = torch.randn(15, _k(qtype))
    batch = cpu_gq.matmul(x, packed)
    for i in range(15):
        assert torch.equal(cpu_gq.matmul(x[i : i + 1], packed), batch[i : i + 1])


@pytest.mark.parametrize("table", ["reference", "cpu"])
@pytest.mark.parametrize("N", [32, 24])  # 24: gq pads each expert to whole blocks of 16 rows
def test_stacked_experts_grouped_matmul_matches_per_expert(table, N):
    ops = TABLES[table]
    E, K = 3, 256
    g = decode(T.Q4_K, random_blocks(T.Q4_K, E * N, K).reshape(E, N, -1))
    assert g.q.shape == (E, N, K) and g.scale.shape == (E, N, K // 32)
    w = ops.pack_groups(torch.from_numpy(g.q), torch.from_numpy(g.scale), torch.from_numpy(g.zero), g.group)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, K)
    y = ops.grouped_group_matmul(x, w, counts)
    full = torch.from_numpy(g.dequantize())  # [E, N, K]
    assert torch.equal(ops.group_dequantize(w), full)
    ref = torch.cat([x[:2] @ full[0].T, x[2:] @ full[2].T])
    bound = torch.cat([_matmul_bound(x[:2], full[0], ref[:2], w.layout), _matmul_bound(x[2:], full[2], ref[2:], w.layout)])
    assert ((y - ref).abs() <= bound).all()


# ---- real SmolLM2 layers under TP ----------------------------------------------------------------------
def _layers(prefix: str, tp: TPGroup, ops: TorchOps, hidden: int, inter: int, heads: int, kv: int, d: int, quant):
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


def _model_layers(source: GGUFSource, rank: int, tp: int, ops: TorchOps, quant=None):
    cfg = source.model_config
    return _layers("model.layers.0", TPGroup(rank, tp), ops, cfg.hidden_size, cfg.intermediate_size,
                   cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, quant or GGUF())


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("rank", [0, 2])
def test_smollm2_layer0_tp3_slices(smollm2_path, rank, table):
    """SmolLM2 Q4_1: 9 heads, 3 KV heads, hidden 576, intermediate 1536; TP 3 splits o_proj's K into 192."""
    source, ops = GGUFSource(smollm2_path), TABLES[table]
    torch.manual_seed(rank)
    for name, layer in _model_layers(source, rank, 3, ops).items():
        layer.load(source)
        assert layer.grouped and not hasattr(layer, "weight") and not hasattr(layer, "q"), name
        w = layer.method.reference_weight(layer)
        expected = _expected(source, layer)
        assert w.shape == expected.shape == (layer.spec.local_out, layer.spec.local_in), name
        if layer.qweight.layout in EXACT_LAYOUTS:
            assert torch.equal(w, expected), name
        else:  # Q4_1: |dw| <= u (8 |d| + |m + 8 d|) <= u (|w| + 16 |d|); bound via the largest d of the layer
            assert (w - expected).abs().max() <= U * (expected.abs().max() + 32 * expected.abs().max()), name
        x = torch.randn(4, layer.spec.local_in)
        y_ref = x @ w.T
        y = layer.method.apply(layer, x, True)
        assert ((y - y_ref).abs() <= _matmul_bound(x, w, y_ref, layer.qweight.layout)).all(), name


def test_gguf_dequantize_keeps_float_weights(smollm2_path):
    source = GGUFSource(smollm2_path)
    layer = _model_layers(source, 0, 1, CpuOps(), GGUF(dequantize=True))["down"]
    layer.load(source)
    assert not layer.grouped and not hasattr(layer, "qweight")
    assert torch.equal(layer.weight, source.read("model.layers.0.mlp.down_proj.weight"))


# ---- a file mixing types -------------------------------------------------------------------------------
HIDDEN, INTER, HEADS, KV = 512, 512, 4, 2


def _mixed_gguf(path: str, types: dict[str, T]) -> str:
    """A one-layer llama GGUF with the given type per tensor (random valid blocks)."""
    writer = GGUFWriter(path, "llama")
    for key, value in [("block_count", 1), ("embedding_length", HIDDEN), ("feed_forward_length", INTER),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV), ("context_length", 64),
                       ("vocab_size", 32)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // 2, HIDDEN), "attn_v": (HIDDEN // 2, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
              "ffn_down": (HIDDEN, INTER)}
    for i, (name, (n, k)) in enumerate(shapes.items()):
        qtype = types[name]
        data = _weights(n, k, i).astype(np.float16) if qtype == T.F16 else random_blocks(qtype, n, k, seed=i)
        writer.add_tensor(f"blk.0.{name}.weight", data, raw_dtype=None if qtype == T.F16 else qtype)
    writer.add_tensor("token_embd.weight", random_blocks(T.Q6_K, 32, HIDDEN), raw_dtype=T.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Q4_K_M_LIKE = {"attn_q": T.Q4_K, "attn_k": T.Q4_K, "attn_v": T.Q6_K, "attn_output": T.Q4_K, "ffn_gate": T.Q4_K,
               "ffn_up": T.Q5_K, "ffn_down": T.Q6_K}


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("rank", [0, 1])
def test_fused_layers_of_mixed_types_share_the_finer_group(tmp_path, table, rank):
    """qkv = Q4_K + Q4_K + Q6_K (groups of 32, 32, 16 -> 16, a zero for all); gate_up Q4_K + Q5_K; TP 2."""
    source = GGUFSource(_mixed_gguf(os.path.join(tmp_path, "mixed.gguf"), Q4_K_M_LIKE))
    ops = TABLES[table]
    for name, layer in _model_layers(source, rank, 2, ops).items():
        layer.load(source)
        assert layer.grouped, name
        assert layer.qweight.group == (16 if name in ("qkv", "down") else 32), name
        w, expected = layer.method.reference_weight(layer), _expected(source, layer)
        if layer.qweight.layout in EXACT_LAYOUTS:
            assert torch.equal(w, expected), name
        else:
            assert (w - expected).abs().max() <= 40 * U * expected.abs().max(), name


def test_a_float_tensor_in_a_fused_layer_keeps_the_layer_float(tmp_path):
    types = dict(Q4_K_M_LIKE, attn_v=T.F16)
    source = GGUFSource(_mixed_gguf(os.path.join(tmp_path, "f16v.gguf"), types))
    layers = _model_layers(source, 0, 1, TorchOps())
    for layer in layers.values():
        layer.load(source)
    assert not layers["qkv"].grouped and layers["o_proj"].grouped
    assert torch.equal(layers["qkv"].weight, _expected(source, layers["qkv"]))


def test_a_corrupt_scale_fails_at_load_naming_file_and_tensor(tmp_path):
    path = _mixed_gguf(os.path.join(tmp_path, "bad.gguf"), Q4_K_M_LIKE)
    source = GGUFSource(path)
    data = source.tensor("model.layers.0.mlp.down_proj.weight").data
    raw = np.memmap(path, mode="r+", dtype=np.uint8)
    offset = data.ctypes.data - np.asarray(source._readers[0].data).ctypes.data  # the tensor's first block
    raw[offset + 208 : offset + 210] = np.array([np.inf], np.float16).view(np.uint8)  # Q6_K d := inf
    raw.flush()
    del raw, source, data
    layer = _model_layers(GGUFSource(path), 0, 1, TorchOps())["down"]
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*ffn_down|down_proj.*Q6_K"):
        layer.load(GGUFSource(path))


# ---- the CPU's gq kernel: its portable build ------------------------------------------------------------
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable build is made by turning AVX2 off (x86)")
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0, T.TQ2_0], ids=lambda t: t.name)
def test_gq_portable_build_matches_the_simd_build(qtype):
    """gq.c's portable C (what a CPU without AVX2, an Arm host, runs) against its AVX2 build on the same weight:
    the same integer sums in another order, so within float32 rounding (1e-5 of |x| @ |w|.T)."""
    from shardserve.workers.device import cpu_gq, cpu_native

    simd = cpu_gq.library()
    portable = cpu_gq.library((*cpu_native.FLAGS, "-mno-avx2", "-mno-fma", "-mno-f16c"))  # half_to_float too
    assert cpu_gq.simd(simd) in (256, 512) and cpu_gq.simd(portable) == 0
    q, scale, zero, group, w = _pieces(qtype, 80, _k(qtype), seed=3)
    packed = cpu_gq.pack(q, scale, zero, group)
    x = torch.randn(6, _k(qtype))
    out = {}
    for name, lib in (("simd", simd), ("portable", portable)):
        y = torch.empty(6, 80)
        lib.gq_matmul(x.data_ptr(), 6, y.data_ptr(), cpu_gq.weight_struct(packed), 2)
        out[name] = y
    assert ((out["simd"] - out["portable"]).abs() <= 1e-5 * F.linear(x.abs(), w.abs()) + 1e-6).all()
    ids, held = torch.arange(80), torch.empty(80, _k(qtype))
    portable.gq_rows(ids.data_ptr(), 80, held.data_ptr(), cpu_gq.weight_struct(packed), 1)
    assert torch.equal(held, w)  # its own float16 conversion (no F16C) and decode, bit for bit
    assert ((out["simd"] - F.linear(x, w)).abs() <= _matmul_bound(x, w, F.linear(x, w), "gq")).all()


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


@pytest.mark.skipif(not _cpu_has("avx512f", "avx512bw", "avx512dq"), reason="this CPU has no AVX-512 BW/DQ")
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_gq_avx512_build_equals_the_avx2_builds_bit_for_bit(qtype):
    """The AVX-512 build takes a block's 16 rows in one register, the AVX2 build in two of 8, with or without VNNI's
    dpwssd (madd_epi16 and an add where a CPU lacks it): lane for lane the same operations, so the same product bit
    for bit, at batch 1 and in a batch (97 rows: the last block padded)."""
    from shardserve.workers.device import cpu_gq, cpu_native

    builds = {
        "avx512": cpu_gq.library(),
        "avx2": cpu_gq.library((*cpu_native.FLAGS, "-mno-avx512f")),
        "avx2-no-vnni": cpu_gq.library((*cpu_native.FLAGS, "-mno-avx512f", "-mno-avxvnni")),
    }
    assert [cpu_gq.simd(lib) for lib in builds.values()] == [512, 256, 256]
    q, scale, zero, group, w = _pieces(qtype, 97, 2 * _k(qtype), seed=5)
    packed = cpu_gq.pack(q, scale, zero, group)
    for rows in (1, 5):
        x = torch.randn(rows, 2 * _k(qtype))
        out = {}
        for name, lib in builds.items():
            y = torch.empty(rows, 97)
            lib.gq_matmul(x.data_ptr(), rows, y.data_ptr(), cpu_gq.weight_struct(packed), 2)
            out[name] = y
        assert torch.equal(out["avx512"], out["avx2"]) and torch.equal(out["avx512"], out["avx2-no-vnni"]), rows
        assert ((out["avx512"] - F.linear(x, w)).abs() <= _matmul_bound(x, w, F.linear(x, w), "gq")).all()


@pytest.mark.parametrize(("cc", "says"), [("/nonexistent/cc", "no C compiler"), ("false", "failed")])
def test_without_a_c_compiler_the_cpu_keeps_atens_kernel(cc, says, tmp_path):
    """No compiler (CC names none), or one that fails: the default table packs for ATen's int4 kernel, and says why
    in the log (a fresh cache directory, so that no earlier build is found)."""
    script = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from shardserve.workers.device.cpu import CpuOps\n"
        "q = torch.randint(-8, 8, (64, 64), dtype=torch.int8); s = torch.rand(64, 2)\n"
        "print(CpuOps().pack_groups(q, s, None, 32).layout)"
    )
    env = {**os.environ, "CC": cc, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["int4pack"], done.stdout
    assert says in done.stderr, done.stderr


def test_gq_weights_off_the_cpu_are_refused_not_read():
    """A gq weight moved to the meta device (or activations elsewhere): a clear error, never a read of a null
    pointer by the C kernel."""
    ops = TABLES["cpu"]
    q, scale, zero, group, _ = _pieces(T.Q4_K, 32, 256)
    w = ops.pack_groups(q, scale, zero, group)
    assert w.layout == "gq"
    with pytest.raises(ValueError, match="CPU only; found tensors on meta"):
        ops.group_matmul(torch.randn(2, 256, device="meta"), w)
    w.to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        ops.group_rows(w, torch.tensor([0]))
