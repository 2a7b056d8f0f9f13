"""The integer weight-only core (workers/quant/weight_only.py) that GPTQ, AWQ, AutoRound and compressed-tensors share:
bit unpacking against packers written here from the formats' descriptions, and the regrouped kernel layout against
the plain dequantized weight, on the reference table (exact) and the CPU int4 kernel (bf16 activations and scales:
relative output error ~3e-3, bound 1e-2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardserve.workers.device.base import TorchOps
from shardserve.workers.device.cpu import CpuOps
from shardserve.workers.quant import weight_only as wo

TABLES = {"reference": TorchOps(), "cpu": CpuOps()}


def _pack_k(u: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] values -> int32 [K * bits / 32, N], value j of a word at bits [j * bits, (j + 1) * bits) (GPTQ)."""
    per = 32 // bits
    u = u.to(torch.int64).view(-1, per, u.shape[-1])
    word = sum(u[:, j] << (j * bits) for j in range(per))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _pack_n(u: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """[R, N] values -> int32 [R, N * bits / 32]; bit position j holds column order[j] of its pack (AWQ)."""
    per = 32 // bits
    order = order or list(range(per))
    u = u.to(torch.int64).view(u.shape[0], -1, per)
    word = sum(u[..., order[j]] << (j * bits) for j in range(per))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpacking_inverts_the_packers(bits):
    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 1 << bits, (64, 48), generator=g)
    assert torch.equal(wo.unpack_along_rows(_pack_k(u, bits), bits).long(), u)
    assert torch.equal(wo.unpack_along_cols(_pack_n(u, bits), bits).long(), u)


def test_awq_interleave_is_undone():
    from shardserve.workers.quant.gptq import AWQ_UNPACK_ORDER

    u = torch.randint(0, 16, (8, 32), generator=torch.Generator().manual_seed(1))
    packed = _pack_n(u, 4, order=[0, 2, 4, 6, 1, 3, 5, 7])  # AutoAWQ's order_map
    assert torch.equal(wo.unpack_along_cols(packed, 4, AWQ_UNPACK_ORDER).long(), u)


CASES = [  # N, K (full), G, bits, act order, this rank's K slice (start, length)
    (64, 576, 128, 4, False, 0, 576),  # partial last group: padded to 640 slots
    (64, 256, 128, 4, True, 0, 256),  # act order, whole K: groups reordered, whole
    (64, 512, 128, 4, True, 256, 256),  # act order, a row-parallel half: runs padded
    (32, 512, 128, 8, False, 100, 200),  # a slice starting and ending inside groups
    (32, 576, 576, 4, False, 0, 576),  # one group per channel: regrouped by 64, exact
    (48, 256, 32, 2, False, 0, 256),
]


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_packed_layout_multiplies_by_the_dequantized_weight(table, case):
    N, K, G, bits, act, start, length = case
    g = torch.Generator().manual_seed(0)
    ng = -(-K // G)
    u = torch.randint(0, 1 << bits, (N, length), generator=g)
    scale = torch.rand(N, ng, generator=g) * 0.01 + 1e-3
    zero = torch.randint(0, 1 << bits, (N, ng), generator=g).float()
    if act:
        perm = torch.randperm(K, generator=g)
        g_all = torch.empty(K, dtype=torch.long)
        g_all[perm] = torch.arange(K) // G
        g_idx = g_all[start:start + length]
    else:
        g_idx = wo.trivial_g_idx(start, length, G)
    w = wo.Unpacked(u, scale, zero, g_idx, bits, G)
    ref = w.dequantize()  # [N, length]: (u - zero[g]) * scale[g]
    # independent of Unpacked.dequantize: the formula spelled out element by element for a few entries
    for n, k in [(0, 0), (N - 1, length - 1), (N // 2, length // 3)]:
        gk = int(g_idx[k])
        assert ref[n, k].item() == pytest.approx(((u[n, k] - zero[n, gk]) * scale[n, gk]).item(), rel=1e-6)
    layer = nn.Module()
    layer.ops = TABLES[table]
    wo.pack(layer, w)
    x = torch.randn(5, length, generator=g)
    y = layer.ops.group_matmul(wo.gather_input(layer, x), layer.qweight)
    rel = ((y - x @ ref.T).norm() / (x @ ref.T).norm()).item()
    back = wo.unpacked_weight(layer)
    if table == "reference":
        assert torch.allclose(back, ref, rtol=0, atol=1e-6) and rel < 1e-5
    else:
        assert rel < 1e-2, rel
    assert layer.k_slots % 32 == 0 and layer.k_slots >= length


def test_a_slice_holding_part_of_each_group_is_not_padded_back_to_whole_groups():
    """One scale per channel (G = K = 576) split over two ranks: 288 slots, not 576; act order over two ranks: each
    group's run is its longest share rounded up to 32, not G."""
    assert wo.runs(wo.trivial_g_idx(288, 288, 576), 576)[3] == 288
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    g_all = torch.empty(512, dtype=torch.long)
    g_all[perm] = torch.arange(512) // 128
    present, k_index, prefix, run = wo.runs(g_all[256:], 128)
    assert run < 128 and len(k_index) == 4 * run and not prefix
    assert sorted(k_index[k_index >= 0].tolist()) == list(range(256))  # every row in exactly one slot
