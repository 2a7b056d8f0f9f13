"""The quantized matmuls in every op table (cpu, cuda, npu), and the grouped ones for MoE experts against a loop over
the per-expert ops: quant_matmul per expert exactly (the same integer sums), weight_quant_matmul per expert within
fp32 summation order (1e-5). The cuda table runs here on CPU tensors: it proves the table has the ops, not CUDA."""

from __future__ import annotations

import pytest
import torch

from shardserve.workers.device import cpu, cuda
from shardserve.workers.device.base import TorchOps
from shardserve.workers.device.quant_ops import QuantOps

COUNTS = torch.tensor([3, 0, 5, 1])  # rows per expert (sorted by expert); expert 1 gets none
E, N, K = 4, 24, 64
M = int(COUNTS.sum())


@pytest.mark.parametrize("table", ["cpu", "cuda"])
def test_cpu_and_cuda_tables_carry_the_quantized_matmuls(table: str):
    """W8A8_DYNAMIC through the table vs the float matmul of the dequantized operands."""
    ops = {"cpu": cpu.backend(), "cuda": cuda.backend()}[table].ops
    assert isinstance(ops, QuantOps)
    torch.manual_seed(0)
    x, w = torch.randn(5, K), torch.randint(-127, 128, (N, K), dtype=torch.int8)
    weight_scale = torch.rand(N) * 1e-2
    x_q, s = ops.dynamic_quant(x)
    y = ops.quant_matmul(x_q, ops.prepare_weight(w, "int8"), weight_scale, pertoken_scale=s, out_dtype=torch.float32)
    ref = (x_q.float() * s.unsqueeze(-1)) @ (w.float() * weight_scale.unsqueeze(-1)).T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def _rows():
    """(expert, row slice) of each non-empty group."""
    out, start = [], 0
    for e, c in enumerate(COUNTS.tolist()):
        out.append((e, slice(start, start + c)))
        start += c
    return out


@pytest.mark.parametrize("pertoken,bias", [(True, False), (False, True)], ids=["dynamic", "static-quant-bias"])
def test_grouped_quant_matmul_matches_per_expert_quant_matmul(pertoken: bool, bias: bool):
    ops = TorchOps()
    torch.manual_seed(0)
    x_q = torch.randint(-128, 128, (M + 2, K), dtype=torch.int8)  # 2 idle rows past the groups (expert parallel)
    w = torch.randint(-128, 128, (E, N, K), dtype=torch.int8)
    scale = torch.rand(E, N) * 1e-3
    tok = torch.rand(M + 2) if pertoken else None
    qb = torch.randint(-5000, 5000, (E, N), dtype=torch.int32) if bias else None
    y = ops.grouped_quant_matmul(x_q, w, scale, COUNTS, tok, qb, out_dtype=torch.float32)
    assert y.shape == (M + 2, N)
    for e, rows in _rows():
        ref = ops.quant_matmul(x_q[rows], w[e], scale[e], None if tok is None else tok[rows],
                               None if qb is None else qb[e], out_dtype=torch.float32)
        assert torch.equal(y[rows], ref), e


@pytest.mark.parametrize("group", [0, 32], ids=["per-channel", "per-group"])
def test_grouped_weight_quant_matmul_matches_per_expert_weight_quant_matmul(group: int):
    ops = TorchOps()
    torch.manual_seed(0)
    x = torch.randn(M, K)
    w = torch.randint(-8, 8, (E, N, K), dtype=torch.int8)  # int4 values
    shape = (E, N, K // group) if group else (E, N)
    scale, offset = torch.rand(shape) * 0.05, torch.randint(-3, 4, shape).float()
    y = ops.grouped_weight_quant_matmul(x, w, scale, COUNTS, offset, group)
    for e, rows in _rows():
        ref = ops.weight_quant_matmul(x[rows], w[e], scale[e], offset[e], group_size=group)
        torch.testing.assert_close(y[rows], ref, rtol=1e-5, atol=1e-5)


def test_npu_emulated_table_inherits_the_grouped_quant_matmuls(npu_ops):
    """The npu table has no grouped quantized kernel wired yet: it runs the reference, through its own
    (emulated) npu_grouped_matmul for the dequantized experts."""
    torch.manual_seed(0)
    x, w = torch.randn(M, K), torch.randint(-128, 128, (E, N, K), dtype=torch.int8)
    scale = torch.rand(E, N) * 0.01
    torch.testing.assert_close(npu_ops.grouped_weight_quant_matmul(x, w, scale, COUNTS),
                               TorchOps().grouped_weight_quant_matmul(x, w, scale, COUNTS), rtol=1e-5, atol=1e-5)


# ---- group-quantized (GGUF) weights on the npu table ------------------------------------------------------
def _affine(n: int, k: int, group: int, with_zero: bool, seed: int = 0):
    """q int8 [n, k], scale/zero [n, k/group]; one group with scale 0 and a zero (a constant sub-block)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-16, 16, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 1e-2
    zero = (torch.rand(n, k // group, generator=g) - 0.5) * 1e-1 if with_zero else None
    scale[0, 1] = 0.0
    return q, scale, zero


@pytest.mark.parametrize("with_zero", [False, True], ids=["symmetric", "zero"])
def test_npu_emulated_group_weights_through_weight_quant_batchmatmul(npu_ops, with_zero):
    """Groups of 32 become npu_weight_quant_batchmatmul's antiquant scale and offset = -zero / scale (a scale-0
    group exactly: values 0, scale zero, offset -1); in bf16 as the kernel takes them. Tolerance: bf16 rounding
    of x, scale, offset and the output (2^-8 relative, summed over K = 128 terms)."""
    q, scale, zero = _affine(48, 128, 32, with_zero)
    ref_ops = TorchOps()
    packed = npu_ops.pack_groups(q, scale, zero, 32)
    assert packed.layout == "antiquant"
    w_ref = ref_ops.group_dequantize(ref_ops.pack_groups(q, scale, zero, 32))
    torch.testing.assert_close(npu_ops.group_dequantize(packed), w_ref, rtol=1e-5, atol=1e-7)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = npu_ops.group_matmul(x, packed)
    ref = x.float() @ w_ref.T
    assert y.dtype == torch.bfloat16 and y.shape == (5, 48)
    assert ((y.float() - ref).abs() <= 2**-6 * (x.float().abs() @ w_ref.abs().T) + 1e-3).all()


def test_npu_emulated_groups_of_16_keep_the_reference_layout(npu_ops):
    """The kernel takes groups that are multiples of 32: Q2_K/Q3_K/Q6_K's 16 stay in the plain layout."""
    q, scale, zero = _affine(16, 64, 16, True)
    packed = npu_ops.pack_groups(q, scale, zero, 16)
    assert packed.layout == "groups"
    x = torch.randn(3, 64)
    torch.testing.assert_close(npu_ops.group_matmul(x, packed), TorchOps().group_matmul(x, packed))


def test_npu_emulated_stacked_experts_stay_int8(npu_ops):
    """GGUF's stacked experts [E, N, K] (groups of 32) in the antiquant layout: each expert with rows goes through
    npu_weight_quant_batchmatmul (emulated: our calls, not Ascend's kernel), an expert with none is skipped, and
    rows past the groups are zeros. Tolerance as for one matrix (bf16 rounding, K = 128)."""
    E, N, K = 3, 48, 128
    pieces = [_affine(N, K, 32, True, seed=e) for e in range(E)]
    q, scale, zero = (torch.stack(t) for t in zip(*pieces))  # [E, N, K], [E, N, K/32] x 2
    packed = npu_ops.pack_groups(q, scale, zero, 32)
    assert packed.layout == "antiquant" and packed.w.dtype == torch.int8 and packed.w.shape == (E, K, N)
    ref_ops = TorchOps()
    w_ref = ref_ops.group_dequantize(ref_ops.pack_groups(q, scale, zero, 32))  # [E, N, K]
    torch.testing.assert_close(npu_ops.group_dequantize(packed), w_ref, rtol=1e-5, atol=1e-7)
    x = torch.randn(7, K, dtype=torch.bfloat16)
    counts = torch.tensor([2, 0, 4])  # expert 1 has no rows; row 6 is past the groups
    y = npu_ops.grouped_group_matmul(x, packed, counts)
    xf = x.float()
    ref = torch.cat([xf[:2] @ w_ref[0].T, xf[2:6] @ w_ref[2].T, torch.zeros(1, N)])
    bound = torch.cat([xf[:2].abs() @ w_ref[0].abs().T, xf[2:6].abs() @ w_ref[2].abs().T, torch.zeros(1, N)])
    assert y.shape == (7, N) and ((y.float() - ref).abs() <= 2**-6 * bound + 1e-3).all()
    assert torch.equal(y[6], torch.zeros(N, dtype=y.dtype))
