"""The torch_npu EMULATION itself, op by op, against independent plain formulas.

These tests do not touch Ascend hardware: they check that tests/npu_emulation implements each op's DOCUMENTED
semantics (so that the plumbing tests built on it mean something), and that it rejects the documented misuses our
calls could commit. Tolerances: exact for integer paths, 1e-5 relative for float32 paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_npu_emulated_rms_norm_and_add_rms_norm(npu_emulation):
    x, r, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    y, rstd = npu_emulation.npu_rms_norm(x, w, epsilon=1e-5)
    torch.testing.assert_close(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    assert rstd.shape == (5, 1) and rstd.dtype == torch.float32
    y2, _, s = npu_emulation.npu_add_rms_norm(x, r, w, epsilon=1e-5)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y2, (x + r) * torch.rsqrt((x + r).pow(2).mean(-1, keepdim=True) + 1e-5) * w)


def _rope_reference(x, angle):
    """Rotate pairs (i, i + D/2) by angle [T, D/2]: the rotate-half convention, written out with complex numbers."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle).unsqueeze(1)
    return torch.cat((z.real, z.imag), dim=-1)


def test_npu_emulated_apply_rotary_pos_emb_is_in_place_rotate_half(npu_emulation):
    T, D = 6, 64
    q, k = torch.randn(T, 4, D), torch.randn(T, 2, D)
    angle = torch.rand(T, D // 2) * 6
    cos = torch.cat((angle.cos(), angle.cos()), -1).unsqueeze(1)
    sin = torch.cat((angle.sin(), angle.sin()), -1).unsqueeze(1)
    q_ref, k_ref = _rope_reference(q, angle), _rope_reference(k, angle)
    q_out, k_out = npu_emulation.npu_apply_rotary_pos_emb(q, k, cos, sin, layout="TND")
    assert q_out is q and k_out is k  # documented in-place update
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    with pytest.raises(ValueError):  # A2/A3 accept D in {64, 128} only
        npu_emulation.npu_apply_rotary_pos_emb(q[..., :32].contiguous(), k[..., :32].contiguous(), cos[..., :32], sin[..., :32], layout="TND")


def test_npu_emulated_rotary_mul_broadcasts_t1d(npu_emulation):
    T, R = 5, 32
    x, angle = torch.randn(T, 3, R), torch.rand(T, R // 2)
    cos = torch.cat((angle.cos(), angle.cos()), -1).unsqueeze(1)
    sin = torch.cat((angle.sin(), angle.sin()), -1).unsqueeze(1)
    torch.testing.assert_close(npu_emulation.npu_rotary_mul(x, cos, sin), _rope_reference(x, angle))


def test_npu_emulated_swiglu(npu_emulation):
    x = torch.randn(4, 10)
    torch.testing.assert_close(npu_emulation.npu_swiglu(x), x[:, :5] * torch.sigmoid(x[:, :5]) * x[:, 5:])


def test_npu_emulated_scatter_pa_kv_cache_norm_layout(npu_emulation):
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kc, vc = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    slots = torch.tensor([17, 0, 63])
    npu_emulation.npu_scatter_pa_kv_cache(k, v, kc, vc, slots, cache_mode="Norm")
    for t, s in enumerate(slots.tolist()):
        torch.testing.assert_close(kc[s // 16, s % 16], k[t])
        torch.testing.assert_close(vc[s // 16, s % 16], v[t])
    assert int((kc != 0).any(-1).any(-1).sum()) == 3
    with pytest.raises(ValueError, match="non-contiguous"):
        npu_emulation.npu_scatter_pa_kv_cache(k.transpose(0, 1).contiguous().transpose(0, 1), v, kc, vc, slots, cache_mode="Norm")


def test_npu_emulated_fused_infer_attention_paged_matches_dense_causal_sdpa(npu_emulation):
    """Two sequences, cache partly filled before this step: right-down causal (sparse_mode 3) per sequence."""
    H, Hkv, D, bs = 4, 2, 16, 16
    ctx, new = [40, 7], [5, 7]  # seq 0 decodes a 5-token chunk after 35 cached keys; seq 1 is a fresh prefill
    tables = [[3, 0, 5], [1, 0, 0]]
    kc, vc = torch.randn(6, bs, Hkv * D), torch.randn(6, bs, Hkv * D)
    q = torch.randn(sum(new), H, D)
    mask = torch.triu(torch.ones(2048, 2048), diagonal=1).to(torch.int8)
    out, lse = npu_emulation.npu_fused_infer_attention_score(
        q, kc, vc, atten_mask=mask, block_table=torch.tensor(tables, dtype=torch.int32), input_layout="TND",
        block_size=bs, actual_seq_lengths=[5, 12], actual_seq_lengths_kv=ctx, num_heads=H, num_key_value_heads=Hkv,
        scale=0.3, sparse_mode=3,
    )
    assert lse.shape == (1,)
    start = 0
    for b in range(2):
        keys = kc[tables[b]].reshape(-1, Hkv, D)[: ctx[b]].transpose(0, 1)  # [Hkv, L, D]
        vals = vc[tables[b]].reshape(-1, Hkv, D)[: ctx[b]].transpose(0, 1)
        qb = q[start : start + new[b]].transpose(0, 1)  # [H, n, D]
        allowed = torch.ones(new[b], ctx[b], dtype=torch.bool).tril(diagonal=ctx[b] - new[b])
        ref = F.scaled_dot_product_attention(qb, keys, vals, attn_mask=allowed, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[start : start + new[b]], ref.transpose(0, 1), rtol=1e-5, atol=1e-5)
        start += new[b]
    with pytest.raises(ValueError, match="upper triangle"):  # 1 marks a masked position, not a visible one
        npu_emulation.npu_fused_infer_attention_score(
            q, kc, vc, atten_mask=1 - mask, block_table=torch.tensor(tables, dtype=torch.int32), input_layout="TND",
            block_size=bs, actual_seq_lengths=[5, 12], actual_seq_lengths_kv=ctx, num_heads=H,
            num_key_value_heads=Hkv, sparse_mode=3,
        )
    with pytest.raises(ValueError, match="int32"):  # documented block_table dtype
        npu_emulation.npu_fused_infer_attention_score(
            q, kc, vc, atten_mask=mask, block_table=torch.tensor(tables), input_layout="TND", block_size=bs,
            actual_seq_lengths=[5, 12], actual_seq_lengths_kv=ctx, num_heads=H, num_key_value_heads=Hkv, sparse_mode=3,
        )


def test_npu_emulated_moe_init_routing_v2_is_a_stable_sort_by_expert(npu_emulation):
    T, k, E = 7, 3, 5
    x = torch.randn(T, 4)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    ex, row_idx, counts, _ = npu_emulation.npu_moe_init_routing_v2(
        x, ids, active_num=T * k, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, E], quant_mode=-1,
    )
    pairs = sorted(range(T * k), key=lambda r: (int(ids.view(-1)[r]), r))  # stable by expert, then source row
    torch.testing.assert_close(ex, x[[r // k for r in pairs]])
    assert row_idx.dtype == torch.int32
    assert [int(row_idx[r]) for r in pairs] == list(range(T * k))
    assert counts.tolist() == torch.bincount(ids.view(-1).long(), minlength=E).tolist()
    _, _, cumsum, _ = npu_emulation.npu_moe_init_routing_v2(
        x, ids, expert_num=E, expert_tokens_num_type=0, expert_tokens_num_flag=True, quant_mode=-1
    )
    assert cumsum.tolist() == counts.cumsum(0).tolist()


def test_npu_emulated_grouped_matmul_is_per_expert_matmul(npu_emulation):
    counts = torch.tensor([3, 0, 4, 2])
    x, w = torch.randn(9, 6), torch.randn(4, 6, 5)
    ref = torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip([0, 3, 3, 7], [3, 3, 7, 9]))])
    for group_list, kind in ((counts, 1), (counts.cumsum(0), 0)):
        y = npu_emulation.npu_grouped_matmul([x], [w], group_list=group_list, split_item=2, group_type=0, group_list_type=kind)
        torch.testing.assert_close(y[0], ref)
    with pytest.raises(ValueError, match="does not fit"):  # counts passed as if cumulative
        npu_emulation.npu_grouped_matmul([x], [w], group_list=counts, split_item=2, group_type=0, group_list_type=0)
    padded = npu_emulation.npu_grouped_matmul(  # rows past the groups (expert parallelism's idle rows): NaN
        [torch.cat([x, torch.randn(2, 6)])], [w], group_list=counts, split_item=2, group_type=0, group_list_type=1
    )[0]
    torch.testing.assert_close(padded[:9], ref)
    assert bool(padded[9:].isnan().all())


@pytest.mark.parametrize("mode", [0, 2])
def test_npu_emulated_finalize_routing_is_a_weighted_sum_per_token(npu_emulation, mode):
    T, k, H = 4, 2, 3
    rows, weights, skip = torch.randn(T * k, H), torch.rand(T, k), torch.randn(T, H)
    dst = torch.randperm(T * k)  # dst[(t, j)]: row of `rows` holding token t's j-th expert output
    index = dst.view(T, k).t().reshape(-1) if mode == 0 else dst  # column-wise (j*T + t) or row-wise (t*k + j)
    out = npu_emulation.npu_moe_finalize_routing(rows, skip, None, None, weights, index.to(torch.int32), None, drop_pad_mode=mode)
    ref = torch.stack([skip[t] + sum(weights[t, j] * rows[dst[t * k + j]] for j in range(k)) for t in range(T)])
    torch.testing.assert_close(out, ref)


def test_npu_emulated_dynamic_quant_int8_and_int4(npu_emulation):
    x = torch.randn(3, 16)
    q, s = npu_emulation.npu_dynamic_quant(x)
    torch.testing.assert_close(s, x.abs().amax(-1) / 127)
    assert q.dtype == torch.int8 and torch.equal(q, torch.round(x / s[:, None]).to(torch.int8))
    q4, s4 = npu_emulation.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    assert q4.dtype == torch.int32 and q4.shape == (3, 2)
    torch.testing.assert_close(s4, x.abs().amax(-1) / 7)
    unpacked = npu_emulation.npu_convert_weight_to_int4pack  # same container: packing the reference values agrees
    assert torch.equal(q4, unpacked(torch.round(x / s4[:, None]).clamp(-8, 7).to(torch.int32)))


def test_npu_emulated_quantize_static(npu_emulation):
    x = torch.randn(2, 8) * 3
    scale, offset = torch.tensor([0.05]), torch.tensor([-3.0])
    q = npu_emulation.npu_quantize(x, scale.reciprocal(), offset, torch.qint8, -1, False)
    assert torch.equal(q, torch.round(x / 0.05 - 3).clamp(-128, 127).to(torch.int8))


def test_npu_emulated_quant_matmul_int8_is_int32_accumulate_then_dequant(npu_emulation):
    M, K, N = 4, 32, 6
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scale, pt, bias = torch.rand(N), torch.rand(M), torch.randint(-1000, 1000, (N,), dtype=torch.int32)
    acc = (x.double() @ w.double().T)  # exact: |sum| < 2^53
    y = npu_emulation.npu_quant_matmul(x, w.t(), scale, pertoken_scale=pt, bias=bias, output_dtype=torch.bfloat16)
    torch.testing.assert_close(y, ((acc + bias.double()) * scale.double() * pt.double()[:, None]).to(torch.bfloat16))
    with pytest.raises(TypeError):  # float32 output is not a documented output dtype
        npu_emulation.npu_quant_matmul(x, w.t(), scale, output_dtype=torch.float32)


def test_npu_emulated_quant_matmul_int4_packed(npu_emulation):
    M, K, N = 3, 16, 8
    x = torch.randint(-8, 8, (M, K), dtype=torch.int32)
    w = torch.randint(-8, 8, (N, K), dtype=torch.int32)
    scale, pt = torch.rand(N), torch.rand(M)
    packed_w = npu_emulation.npu_convert_weight_to_int4pack(w).t()  # (K/8, N), transposed from (N, K/8)
    y = npu_emulation.npu_quant_matmul(
        npu_emulation.npu_convert_weight_to_int4pack(x), packed_w, scale, pertoken_scale=pt, output_dtype=torch.float16
    )
    torch.testing.assert_close(y, ((x.double() @ w.double().T) * scale.double() * pt.double()[:, None]).half())


@pytest.mark.parametrize("group", [0, 32])
def test_npu_emulated_weight_quant_batchmatmul_adds_the_offset(npu_emulation, group):
    M, K, N = 3, 64, 5
    x = torch.randn(M, K)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    G = K // group if group else 1
    scale, offset = torch.rand(G, N), torch.randn(G, N)
    rep = group or K
    deq = (w.double().T + offset.double().repeat_interleave(rep, 0)) * scale.double().repeat_interleave(rep, 0)  # [K, N]
    y = npu_emulation.npu_weight_quant_batchmatmul(
        x, w.t(), scale if group else scale[0], offset if group else offset[0], antiquant_group_size=group
    )
    torch.testing.assert_close(y, (x.double() @ deq).float(), rtol=1e-5, atol=1e-4)


def test_npu_emulated_mx_quant_and_matmul(npu_emulation):
    M, K, N = 3, 96, 4  # 3 blocks of 32: an odd count, so the pair layout is padded
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.1
    xq, xs = npu_emulation.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (M, 2, 2) and xs.dtype == torch.uint8
    exp = torch.floor(torch.log2(x.view(M, 3, 32).abs().amax(-1))) - 8  # [M, 3]
    assert torch.equal(xs.view(M, 4)[:, :3].long(), (exp + 127).long()) and bool((xs.view(M, 4)[:, 3] == 0).all())
    x_deq = xq.float() * torch.exp2(exp).repeat_interleave(32, 1)
    torch.testing.assert_close(x_deq, x, rtol=2**-3, atol=0)  # e4m3: 3 mantissa bits
    wq, ws = npu_emulation.npu_dynamic_mx_quant(w, dst_type=torch.float8_e4m3fn)  # [N, 2, 2] -> x2 scale [2, N, 2]
    w_exp = ws.view(N, 4)[:, :3].float() - 127
    w_deq = wq.float() * torch.exp2(w_exp).repeat_interleave(32, 1)
    y = npu_emulation.npu_quant_matmul(
        xq, wq.t(), ws.transpose(0, 1), scale_dtype=npu_emulation.float8_e8m0fnu, pertoken_scale=xs,
        pertoken_scale_dtype=npu_emulation.float8_e8m0fnu, output_dtype=torch.bfloat16, group_sizes=[1, 1, 32],
    )
    torch.testing.assert_close(y, (x_deq @ w_deq.T).to(torch.bfloat16))
