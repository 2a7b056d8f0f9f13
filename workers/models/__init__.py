"""Model architectures by name (ModelConfig.architecture)."""

from __future__ import annotations

import importlib

# name -> (module, class). MoE is a layer inside the same decoder, not a second model.
ARCHITECTURES = {
    "llama": ("llama", "DecoderModel"),
    "qwen2": ("llama", "DecoderModel"),
    "qwen3": ("llama", "DecoderModel"),
    "qwen2_moe": ("llama", "DecoderModel"),
    "qwen3_moe": ("llama", "DecoderModel"),
    "gemma3": ("gemma3", "Gemma3Model"),
}


def model_class(architecture: str) -> type:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f"shardserve.workers.models.{module}"), cls)
