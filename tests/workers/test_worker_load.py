"""A worker's load: every checkpoint tensor is read by some layer, or the load fails naming what was left over;
the tensors HF itself ignores (a stored copy of a tied lm_head, cached rotary tables) are not left over."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardserve.workers.loader import CheckpointError
from shardserve.workers.worker import Worker
from tests.fixtures.tiny_models import make_tiny


def _copy_with(cache_dir: str, dst, extra: dict[str, torch.Tensor], **config) -> str:
    """The tiny llama checkpoint copied to `dst` with tensors `extra` added and config.json keys overridden."""
    src = make_tiny("llama", cache_dir)
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors")) | extra
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f) | config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def _init(path: str) -> Worker:
    worker = Worker(path, "cpu", "float32", None, 0, 1)
    worker.init("127.0.0.1", 0)
    return worker


def test_a_tensor_no_layer_reads_fails_the_load(cache_dir, tmp_path):
    extra = {"model.layers.0.mlp.down_proj.weight_scale": torch.ones(64, 1), "model.layers.1.extra.weight": torch.ones(2)}
    path = _copy_with(cache_dir, tmp_path / "m", extra)
    names = r"\['model\.layers\.0\.mlp\.down_proj\.weight_scale', 'model\.layers\.1\.extra\.weight'\]"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: 2 tensors were not loaded by any layer: {names}"):
        _init(path)


def test_what_hf_ignores_is_not_left_over(cache_dir, tmp_path):
    """tie_word_embeddings with lm_head.weight still stored (HF ignores the copy), and old exports' inv_freq."""
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    path = _copy_with(cache_dir, tmp_path / "m", extra, tie_word_embeddings=True)
    assert "lm_head.weight" in load_file(os.path.join(path, "model.safetensors"))
    assert _init(path).cfg.tie_word_embeddings
