"""Checkpoint loading: open a GGUF file or a safetensors HF directory as a CheckpointSource."""

from __future__ import annotations

import json
import os

from shardserve.workers.loader.gguf_source import GGUFSource, find_gguf_file
from shardserve.workers.loader.safetensors_source import SafetensorsSource
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.models.config import ModelConfig

__all__ = ["CheckpointError", "CheckpointSource", "open_checkpoint"]


def open_checkpoint(path: str) -> tuple[CheckpointSource, ModelConfig]:
    if not os.path.exists(path):
        raise CheckpointError(path, None, "no such file or directory")
    if find_gguf_file(path):
        source = GGUFSource(path)
        return source, source.model_config
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(path, None, "neither a .gguf file nor a directory with config.json")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(cfg_path, None, f"invalid JSON: {e}") from e
    return SafetensorsSource(path), ModelConfig.from_hf(cfg)
