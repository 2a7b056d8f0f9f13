"""Rotary frequencies vs transformers' own rope initialisers (default, linear, llama3)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from shardserve.workers.layers.rotary import inv_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_inv_frequencies_match_transformers(scaling):
    theta, head_dim = 500000.0, 128
    ours = inv_frequencies(head_dim, theta, scaling).float()
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                      rope_parameters=params)
    if scaling is None:
        ref = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0), (ours - ref.float()).abs().max()


def test_unknown_scaling_is_refused_by_name():
    with pytest.raises(ValueError, match="yarn"):
        inv_frequencies(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})
