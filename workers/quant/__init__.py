"""Quantization formats: one file each, registered by name; `detect` picks one from the checkpoint."""

from __future__ import annotations

import os

from shardserve.workers.loader import read_config
from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.quant import compressed_tensors, gguf, gptq, modelslim, unquantized  # noqa: F401 (registers)
from shardserve.workers.quant.base import QuantConfig, registered

# Detection order (../shared/formats.md): ModelSlim description file, config.json quant_method, GGUF, plain.
DETECTION_ORDER = ["modelslim", "gptq", "awq", "auto-round", "compressed-tensors", "gguf", "unquantized"]


def detect(model_path: str, override: str | None = None, gguf_dequantize: bool = False) -> QuantConfig:
    """The format of `model_path`; `override` (--quantization) must agree with what the files say.
    `gguf_dequantize`: a GGUF checkpoint's weights are dequantized at load, not kept quantized."""
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
    if found.name == "gguf" and gguf_dequantize:
        found = gguf.GGUF(dequantize=True)
    if found.name == "unquantized":
        _refuse_declared_quantization(model_path, formats)
    if override and override != found.name:
        if override not in formats:
            raise ValueError(f"--quantization {override!r} is not a known format; known: {sorted(formats)}")
        raise ValueError(
            f"--quantization {override!r} contradicts the checkpoint at {model_path}, which is {found.name!r}"
        )
    return found


def _refuse_declared_quantization(model_path: str, formats: dict) -> None:
    """"unquantized" is the fallback that matches any directory: a config.json that declares a quantization no
    registered format recognised must not load as if it were plain float weights."""
    cfg_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(cfg_path):
        return
    qcfg = read_config(cfg_path).get("quantization_config")
    if qcfg is None:
        return
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    supported = sorted(n for n in formats if n != "unquantized")
    raise CheckpointError(
        cfg_path, None,
        f"config.json declares quantization_config.quant_method {method!r}, which this build cannot load yet; "
        f"supported: {supported}",
    )
