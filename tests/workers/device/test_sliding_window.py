"""TorchOps.paged_attention with a sliding window vs attention written out per query (the reference)."""

from __future__ import annotations

import pytest
import torch

from shardserve.workers.device.base import TorchOps
from shardserve.workers.model_runner import ModelRunner
from shardserve.workers.step import SeqStep


@pytest.mark.parametrize("window", [1, 5, 64])
def test_paged_attention_window_matches_per_query_reference(window):
    """A query at position p attends keys p - window < j <= p (transformers' sliding_window_overlay): a chunked
    prefill after a prefix, a decode, a fresh prefill, batched with padding. Tolerance 1e-5 (float32)."""
    torch.manual_seed(0)
    H, Hkv, D, bs = 4, 1, 32, 16
    seqs = [
        SeqStep(0, list(range(12)), 29, [4, 9, 2], True),
        SeqStep(1, [5], 40, [7, 1, 3], True),
        SeqStep(2, list(range(18)), 0, [6, 0], True),
    ]
    _, positions, meta = ModelRunner(None, [], bs, torch.device("cpu"))._prepare(seqs)
    k_cache, v_cache = torch.randn(10, bs, Hkv, D), torch.randn(10, bs, Hkv, D)
    q = torch.randn(positions.shape[0], H, D)
    out = TorchOps().paged_attention(q, k_cache, v_cache, meta, 0.2, window)
    row = 0
    for s in seqs:
        keys = k_cache[s.block_table].reshape(-1, Hkv, D)  # [L, Hkv, D] in position order
        vals = v_cache[s.block_table].reshape(-1, Hkv, D)
        for p in range(s.start_pos, s.start_pos + len(s.token_ids)):
            lo = max(0, p - window + 1)
            scores = torch.einsum("hd,khd->hk", q[row], keys[lo : p + 1]) * 0.2  # [H, keys], GQA: Hkv = 1
            ref = torch.einsum("hk,khd->hd", scores.softmax(-1), vals[lo : p + 1])
            torch.testing.assert_close(out[row], ref, rtol=1e-5, atol=1e-5)
            row += 1
