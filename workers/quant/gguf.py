"""GGUF (every ggml type gguf-py can dequantize): each rank reads only its slice of the packed blocks.

This first member of the contract dequantizes the rank's blocks at load (GGUFSource.read, gguf-py's
dequantizer) into the compute dtype; keeping every type quantized in memory builds on it.
"""

from __future__ import annotations

from shardserve.workers.loader.gguf_source import find_gguf_file
from shardserve.workers.quant.base import LinearMethod, QuantConfig, register
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod


@register
class GGUF(QuantConfig):
    name = "gguf"

    @classmethod
    def detect(cls, model_path: str) -> GGUF | None:
        return cls() if find_gguf_file(model_path) else None

    def linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()
