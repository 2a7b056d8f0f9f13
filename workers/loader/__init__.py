"""Checkpoint loading: open a GGUF file or a safetensors HF directory as a CheckpointSource."""

from __future__ import annotations

import json
import os

from shardserve.workers.loader.gguf_source import GGUFSource, find_gguf_file
from shardserve.workers.loader.safetensors_source import SafetensorsSource
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.models.config import ModelConfig

__all__ = ["CheckpointError", "CheckpointSource", "open_checkpoint"]


# pickled PyTorch weights: unpickling runs code from the file, so they are refused, never opened
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def open_checkpoint(path: str) -> tuple[CheckpointSource, ModelConfig]:
    """Checkpoints are read only as GGUF or safetensors; anything else is a CheckpointError naming the file."""
    if not os.path.exists(path):
        raise CheckpointError(path, None, "no such file or directory")
    refuse_pickles(path)
    if find_gguf_file(path):
        source = GGUFSource(path)
        return source, source.model_config
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(path, None, "neither a .gguf file nor a directory with config.json")
    cfg = read_config(cfg_path)
    try:
        model_config = ModelConfig.from_hf(cfg)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(cfg_path, None, f"not a usable model config: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(cfg_path, None, f"not a usable model config: {e}") from None
    return SafetensorsSource(path), model_config


def read_config(cfg_path: str) -> dict:
    """config.json as a dict, or a CheckpointError naming it."""
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(cfg_path, None, f"invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(cfg_path, None, f"invalid config: a JSON {type(cfg).__name__}, not an object")
    return cfg


def refuse_pickles(path: str) -> None:
    """A pickled weights file, or a directory holding only pickled weights: refused with how to convert it."""
    if os.path.isfile(path):
        pickles = [path] if path.endswith(PICKLE_SUFFIXES) else []
    else:
        names = os.listdir(path)
        if any(n.endswith((".safetensors", ".gguf")) for n in names):
            return
        pickles = sorted(os.path.join(path, n) for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            pickles[0], None,
            "pickled PyTorch weights are not loaded (unpickling can run code from the file); convert them to "
            "safetensors, e.g. `model.save_pretrained(out_dir, safe_serialization=True)` after loading them with "
            "transformers where you trust the file, or huggingface's convert-to-safetensors space",
        )
