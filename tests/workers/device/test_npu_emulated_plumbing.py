"""NpuOps (workers/device/npu.py) through the torch_npu EMULATION vs the plain-torch op tables it must agree with.

What this proves: our torch_npu calls pass the layouts, index conventions and argument values that the DOCUMENTED
op semantics need to reproduce TorchOps / QuantOps. What it cannot prove: Ascend kernels, their numerics or limits
the emulation does not model. Tolerances: 1e-5 for float32 paths; bf16/fp16 paths are compared at their
precision (the NPU quant kernels write float16/bfloat16 only).
"""

from __future__ import annotations

import pytest
import torch

from shardserve.workers.device.base import TorchOps
from shardserve.workers.device.quant_ops import QuantOps
from shardserve.workers.model_runner import ModelRunner
from shardserve.workers.step import SeqStep

REF = TorchOps()
QREF = QuantOps()
F32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_npu_emulated_norms_match_torch_ops(npu_ops, dtype):
    x, r, w = torch.randn(6, 48, dtype=dtype), torch.randn(6, 48, dtype=dtype), torch.randn(48, dtype=dtype)
    torch.testing.assert_close(npu_ops.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))
    y, s = npu_ops.add_rms_norm(x, r, w, 1e-6)
    y_ref, s_ref = REF.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


@pytest.mark.parametrize("D,R", [(64, 64), (128, 128), (64, 32), (96, 96)], ids=["fused64", "fused128", "partial", "d96"])
def test_npu_emulated_rotary_matches_torch_ops(npu_ops, D, R):
    """The fused in-place op for full rotary with D in {64, 128}; npu_rotary_mul on a slice otherwise."""
    T, H, Hkv = 7, 6, 2
    qkv = torch.randn(T, (H + 2 * Hkv) * D)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # non-contiguous views, as in Attention.forward
    q, k = q.view(T, H, D), k.view(T, Hkv, D)
    angles = torch.arange(T).unsqueeze(1) * torch.rand(R // 2)
    cos, sin = angles.cos(), angles.sin()
    q_ref, k_ref = REF.rotary(q, k, cos, sin)
    q_out, k_out = npu_ops.rotary(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, **F32)
    torch.testing.assert_close(k_out, k_ref, **F32)


def test_npu_emulated_swiglu_matches_torch_ops(npu_ops):
    x = torch.randn(5, 32)
    torch.testing.assert_close(npu_ops.swiglu(x), REF.swiglu(x))


def _mixed_batch():
    """A chunked prefill after a 29-token prefix, a decode at position 40, a fresh prefill: blocks out of order."""
    return [
        SeqStep(0, list(range(12)), 29, [4, 9, 2], True),
        SeqStep(1, [5], 40, [7, 1, 3], True),
        SeqStep(2, list(range(18)), 0, [6, 0], True),
    ]


@pytest.mark.parametrize("window", [None, 7], ids=["causal", "sliding-window"])
def test_npu_emulated_paged_kv_and_attention_match_torch_ops(npu_ops, window):
    """With a window, sparse_mode 4 (band) against TorchOps' window mask: the decode row and the chunked rows
    see fewer keys than their context."""
    H, Hkv, D, bs, blocks = 6, 2, 64, 16, 10
    ids, positions, meta = ModelRunner(None, [], bs, torch.device("cpu"))._prepare(_mixed_batch())
    T = ids.shape[0]
    qkv = torch.randn(T, (H + 2 * Hkv) * D)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))  # strided views
    cache = torch.randn(2, blocks, bs, Hkv, D)  # the same earlier context for both tables
    k_ref, v_ref = cache[0].clone(), cache[1].clone()
    k_npu, v_npu = cache[0].clone(), cache[1].clone()
    REF.write_kv(k, v, k_ref, v_ref, meta.slot_mapping)
    npu_ops.write_kv(k, v, k_npu, v_npu, meta.slot_mapping)
    assert torch.equal(k_npu, k_ref) and torch.equal(v_npu, v_ref)
    out = npu_ops.paged_attention(q, k_npu, v_npu, meta, D**-0.5, window)
    torch.testing.assert_close(out, REF.paged_attention(q, k_ref, v_ref, meta, D**-0.5, window), **F32)


def _moe(ops, x, ids, weights, w13, w2, groups, shared):
    xs, row_idx, counts = ops.moe_init_routing(x, ids, groups)
    counts = counts[: w13.shape[0]]
    y = ops.grouped_matmul(ops.swiglu(ops.grouped_matmul(xs, w13, counts)), w2, counts)
    valid = torch.arange(y.shape[0]) < counts.sum()  # expert parallelism: rows of the idle group count zero
    return ops.moe_finalize_routing(y.masked_fill(~valid.unsqueeze(-1), 0.0), weights, row_idx, shared)


@pytest.mark.parametrize("idle_group", [False, True], ids=["all-local", "expert-parallel"])
def test_npu_emulated_moe_pipeline_matches_torch_ops(npu_ops, idle_group):
    """init_routing_v2 -> grouped_matmul (w13) -> swiglu -> grouped_matmul (w2) -> finalize_routing, as the MoE
    block runs it; with an idle group, rows routed to other ranks' experts sort last and are masked."""
    T, H, inter, E, k = 11, 16, 8, 4, 2
    x, shared = torch.randn(T, H), torch.randn(T, H)
    ids = torch.stack([torch.randperm(E + idle_group)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    w13 = torch.randn(E, 2 * inter, H).transpose(1, 2).contiguous().transpose(1, 2)  # the kernel layout, [E, N, K] view
    w2 = torch.randn(E, H, inter)
    groups = E + idle_group
    ours = _moe(npu_ops, x, ids, weights, w13, w2, groups, shared)
    torch.testing.assert_close(ours, _moe(REF, x, ids, weights, w13, w2, groups, shared), **F32)
    per_token = torch.stack([  # independent of both tables: a loop over (token, choice)
        shared[t] + sum(
            weights[t, j] * (w2[e] @ REF.swiglu(w13[e] @ x[t])) for j, e in enumerate(ids[t].tolist()) if e < E
        )
        for t in range(T)
    ])
    torch.testing.assert_close(ours, per_token, rtol=1e-4, atol=1e-4)


# ---- quantized matmuls vs the QuantOps references (ModelSlim compute rules) ----------------------------------
M, K, N = 5, 64, 24


def test_npu_emulated_w8a8_static_matches_reference(npu_ops):
    x = torch.randn(M, K)
    input_scale, input_offset = torch.tensor([0.03]), torch.tensor([-4.0])
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    deq_scale, quant_bias = torch.rand(N) * 1e-3, torch.randint(-5000, 5000, (N,), dtype=torch.int32)
    xq = npu_ops.static_quant(x, input_scale, input_offset)
    assert torch.equal(xq, QREF.static_quant(x, input_scale, input_offset))
    y = npu_ops.quant_matmul(xq, npu_ops.prepare_weight(w, "int8"), deq_scale, bias=quant_bias, out_dtype=torch.bfloat16)
    ref = QREF.quant_matmul(xq, QREF.prepare_weight(w, "int8"), deq_scale, bias=quant_bias, out_dtype=torch.bfloat16)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("bits,kind", [(8, "int8"), (4, "int4")], ids=["w8a8_dynamic", "w4a4_dynamic"])
def test_npu_emulated_dynamic_quant_matmul_matches_reference(npu_ops, bits, kind):
    x = torch.randn(M, K, dtype=torch.bfloat16)
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    w = torch.randint(lo, hi, (N, K), dtype=torch.int8)
    weight_scale = torch.rand(N) * 0.01
    xq, s = npu_ops.dynamic_quant(x, bits=bits)
    y = npu_ops.quant_matmul(xq, npu_ops.prepare_weight(w, kind), weight_scale, pertoken_scale=s, out_dtype=torch.bfloat16)
    xq_ref, s_ref = QREF.dynamic_quant(x, bits=bits)
    torch.testing.assert_close(s, s_ref)
    ref = QREF.quant_matmul(xq_ref, w, weight_scale, pertoken_scale=s_ref, out_dtype=torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=2**-7, atol=1e-3)  # the int4 path goes out through float16


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 0), ("int4", 32)], ids=["w8a16", "w4a16", "w4a16_g32"])
def test_npu_emulated_weight_quant_matmul_matches_reference(npu_ops, kind, group):
    """ModelSlim's w = (w_q - offset) * scale, against a kernel that adds its offset."""
    x = torch.randn(M, K, dtype=torch.bfloat16)
    lo, hi = (-128, 128) if kind == "int8" else (-8, 8)
    w = torch.randint(lo, hi, (N, K), dtype=torch.int8)
    shape = (N, K // group) if group else (N,)
    scale, offset = (torch.rand(shape) * 0.05).to(x.dtype), torch.randint(-3, 4, shape).to(x.dtype)
    y = npu_ops.weight_quant_matmul(x, npu_ops.prepare_weight(w, kind), scale, offset, group_size=group)
    ref = QREF.weight_quant_matmul(x, w, scale, offset, group_size=group)
    torch.testing.assert_close(y, ref, rtol=2**-7, atol=1e-2)


def test_npu_emulated_mxfp8_matches_reference(npu_ops):
    Kmx = 96  # 3 blocks of 32: an odd number of E8M0 scales per row
    x = torch.randn(M, Kmx, dtype=torch.bfloat16)
    w = (torch.randn(N, Kmx) * 4).to(torch.float8_e4m3fn)
    w_scale = torch.randint(120, 125, (N, Kmx // 32), dtype=torch.uint8)
    y = npu_ops.mx_quant_matmul(x, npu_ops.prepare_weight(w, "fp8"), npu_ops.prepare_mx_scale(w_scale))
    ref = QREF.mx_quant_matmul(x, QREF.prepare_weight(w, "fp8"), QREF.prepare_mx_scale(w_scale))
    torch.testing.assert_close(y, ref, rtol=2**-7, atol=1e-3)
