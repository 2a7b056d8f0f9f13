"""The CPU table's fused decode ops (kernels/fused.c through cpu_fused.py) against base.py's torch ops, the
reference: float32, results within float32 rounding of another summation order (rtol 1e-5, atol 1e-6)."""

from __future__ import annotations

import pytest
import torch

from shardserve.workers.device import cpu_fused
from shardserve.workers.device.base import AttentionMetadata, TorchOps
from shardserve.workers.device.cpu import CpuOps

REF, CPU = TorchOps(), CpuOps()
TOL = {"rtol": 1e-5, "atol": 1e-6}


def test_the_library_builds_here():
    assert cpu_fused.library() is not None  # else every test below would compare torch with itself


@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (3, 9, 64)])
def test_rms_norm_and_the_residual_add(shape):
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(CPU.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5), **TOL)
    (y, r), (y_ref, r_ref) = CPU.add_rms_norm(x, res, w, 1e-6), REF.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(r, r_ref)  # one float32 addition each
    torch.testing.assert_close(y, y_ref, **TOL)


@pytest.mark.parametrize("rotated", [64, 32])  # full rotary, and partial (the rest passes through)
def test_rotary_on_strided_views(rotated):
    g = torch.Generator().manual_seed(1)
    T, H, Hkv, D = 5, 9, 3, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # views with the qkv row stride, as attention makes
    q, k = q.view(T, H, D), k.view(T, Hkv, D)
    angles = torch.rand(T, rotated // 2, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    before = qkv.clone()
    (rq, rk), (eq, ek) = CPU.rotary(q, k, cos, sin), REF.rotary(q, k, cos, sin)
    torch.testing.assert_close(rq, eq, **TOL)
    torch.testing.assert_close(rk, ek, **TOL)
    assert torch.equal(qkv, before)  # the inputs are not rotated in place


def _decode_meta(context_lens: list[int], tables: list[list[int]], block_size: int) -> AttentionMetadata:
    B, max_k = len(context_lens), max(context_lens)
    nb = -(-max_k // block_size)
    padded = [t[:nb] + [0] * (nb - len(t[:nb])) for t in tables]
    ctx = torch.tensor(context_lens)
    j = torch.arange(max_k).view(1, 1, -1)
    mask = (j < ctx.view(-1, 1, 1)).unsqueeze(1)  # [B, 1, 1, max_k]
    slots = [t[(c - 1) // block_size] * block_size + (c - 1) % block_size for t, c in zip(tables, context_lens)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(padded), query_lens=torch.ones(B, dtype=torch.long),
        context_lens=ctx, pad_index=torch.arange(B), attn_mask=mask, max_q=1, max_k=max_k, is_prefill=False,
    )


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("H", "Hkv"), [(9, 3), (4, 4)])
def test_decode_attention_reads_the_paged_cache(window, H, Hkv):
    """Three sequences of different lengths (one shorter than a block, one past the window) on scattered blocks."""
    g = torch.Generator().manual_seed(2)
    D, bs = 64, 16
    k_cache, v_cache = torch.randn(12, bs, Hkv, D, generator=g), torch.randn(12, bs, Hkv, D, generator=g)
    meta = _decode_meta([37, 3, 16], [[7, 2, 9], [4], [11]], bs)
    q = torch.randn(3, H, D, generator=g)
    out = CPU.paged_attention(q, k_cache, v_cache, meta, D**-0.5, window)
    torch.testing.assert_close(out, REF.paged_attention(q, k_cache, v_cache, meta, D**-0.5, window), **TOL)


def test_other_dtypes_take_torchs_ops():
    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    assert cpu_fused.add_rms_norm(x, None, w, 1e-6) is None
    assert torch.equal(CPU.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))
