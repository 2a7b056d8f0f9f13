"""Quantization formats: one file each, registered by name; `detect` picks one from the checkpoint."""

from __future__ import annotations

from shardserve.workers.quant import gguf, unquantized  # noqa: F401  (registers the formats)
from shardserve.workers.quant.base import QuantConfig, registered

# Detection order (../shared/formats.md): ModelSlim description file, config.json quant_method, GGUF, plain.
DETECTION_ORDER = ["modelslim", "gptq", "awq", "auto-round", "compressed-tensors", "gguf", "unquantized"]


def detect(model_path: str, override: str | None = None) -> QuantConfig:
    """The format of `model_path`; `override` (--quantization) must agree with what the files say."""
    formats = registered()
    found: QuantConfig | None = None
    checked = []
    for name in DETECTION_ORDER:
        if name not in formats:
            continue
        checked.append(name)
        found = formats[name].detect(model_path)
        if found is not None:
            break
    if found is None:
        raise ValueError(f"{model_path}: no quantization format matched (checked {checked})")
    if override and override != found.name:
        if override not in formats:
            raise ValueError(f"--quantization {override!r} is not a known format; known: {sorted(formats)}")
        raise ValueError(
            f"--quantization {override!r} contradicts the checkpoint at {model_path}, which is {found.name!r}"
        )
    return found
