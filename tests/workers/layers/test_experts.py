"""Grouped experts under the quant contract: per-expert biases (w13 split with I, w2's on one TP rank, each EP
rank its own experts'), apply vs the method's per-expert reference, and the experts left to other EP ranks.

Oracle: a loop over rows, y[m] = W[e(m)] x[m] + b[e(m)], from the tensors written to the file; fp32, tolerance
1e-5 (summation order only).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from shardserve.workers.device.base import TorchOps
from shardserve.workers.layers.moe import GroupedExperts
from shardserve.workers.loader.safetensors_source import SafetensorsSource
from shardserve.workers.quant.base import MoESpec, Shard
from shardserve.workers.quant.unquantized import Unquantized

OPS = TorchOps()
F32 = dict(rtol=1e-5, atol=1e-5)
PREFIX = "model.layers.0.mlp.experts"
E, H, INTER = 4, 32, 16
COUNTS = torch.tensor([3, 0, 4, 2])  # rows per expert, sorted by expert; expert 1 gets none


def _checkpoint(tmp_path) -> tuple[SafetensorsSource, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ckpt = {}
    for e in range(E):
        for m, shape in (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER))):
            ckpt[f"{PREFIX}.{e}.{m}.weight"] = torch.randn(*shape, generator=g)
            ckpt[f"{PREFIX}.{e}.{m}.bias"] = torch.randn(shape[0], generator=g)
    save_file(ckpt, os.path.join(tmp_path, "model.safetensors"))
    return SafetensorsSource(str(tmp_path)), ckpt


def _experts(which: str, rank: int, size: int, ep: bool) -> GroupedExperts:
    n = E // size if ep else INTER // size
    experts, rows = (Shard(rank * n, n), Shard(0, INTER)) if ep else (Shard(0, E), Shard(rank * n, n))
    spec = MoESpec(PREFIX, which, E, experts, H, INTER, rows, torch.float32, rank, size)
    return GroupedExperts(spec, Unquantized(), OPS)


def _per_row(ckpt: dict[str, torch.Tensor], m: str, x: torch.Tensor) -> torch.Tensor:
    group = torch.repeat_interleave(torch.arange(E), COUNTS)  # [M] expert of each row
    return torch.stack([ckpt[f"{PREFIX}.{e}.{m}.weight"] @ x[i] + ckpt[f"{PREFIX}.{e}.{m}.bias"]
                        for i, e in enumerate(group.tolist())])


def test_w2_bias_is_counted_once_over_tp2(tmp_path):
    source, ckpt = _checkpoint(tmp_path)
    h = torch.randn(int(COUNTS.sum()), INTER)
    ranks = [_experts("w2", r, 2, ep=False) for r in range(2)]
    for layer in ranks:
        layer.load(source)
    assert not ranks[1].bias.any()
    partial = sum(layer(h[:, r * 8 : (r + 1) * 8], COUNTS, True) for r, layer in enumerate(ranks))
    torch.testing.assert_close(partial, _per_row(ckpt, "down_proj", h), **F32)


def test_w13_bias_splits_with_i(tmp_path):
    source, ckpt = _checkpoint(tmp_path)
    x = torch.randn(int(COUNTS.sum()), H)
    gate, up = _per_row(ckpt, "gate_proj", x), _per_row(ckpt, "up_proj", x)
    for r in range(2):
        layer = _experts("w13", r, 2, ep=False)
        layer.load(source)
        rows = slice(r * 8, (r + 1) * 8)
        torch.testing.assert_close(layer(x, COUNTS, False), torch.cat([gate[:, rows], up[:, rows]], -1), **F32)


def test_expert_parallel_ranks_hold_their_experts_biases(tmp_path):
    """EP 2: rank r holds experts [2r, 2r + 2) whole, K unsplit: each applies its own experts' biases."""
    source, ckpt = _checkpoint(tmp_path)
    h = torch.randn(int(COUNTS.sum()), INTER)
    expected = _per_row(ckpt, "down_proj", h)
    first = 0
    for r in range(2):
        layer = _experts("w2", r, 2, ep=True)
        layer.load(source)
        counts = COUNTS[2 * r : 2 * r + 2]
        rows = slice(first, first + int(counts.sum()))
        torch.testing.assert_close(layer(h[rows], counts, True), expected[rows], **F32)
        first = rows.stop


def test_other_ranks_experts_are_not_left_over(tmp_path):
    source, _ = _checkpoint(tmp_path)
    for which in ("w13", "w2"):
        _experts(which, 0, 2, ep=True).load(source)  # rank 0 reads experts 0 and 1 only
    assert source.unconsumed() == []


@pytest.mark.parametrize("which", ["w13", "w2"])
def test_apply_matches_reference(tmp_path, which: str):
    source, _ = _checkpoint(tmp_path)
    layer = _experts(which, 1, 2, ep=False)
    layer.load(source)
    x = torch.randn(int(COUNTS.sum()), layer.spec.local_shape[2])
    torch.testing.assert_close(layer(x, COUNTS, True), layer.method.reference(layer, x, COUNTS), **F32)
