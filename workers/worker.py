"""The TP worker actor: loads its shard of the weights, holds its KV cache, runs each step plan."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from shardserve.workers.channel import StepServer
from shardserve.workers.device import get_backend
from shardserve.workers.distributed import init_tp_group
from shardserve.workers.loader import CheckpointError, CheckpointSource, open_checkpoint
from shardserve.workers.model_runner import ModelRunner
from shardserve.workers.models import model_class
from shardserve.workers.models.config import ModelConfig
from shardserve.workers.quant import detect
from shardserve.workers.step import ScoreCall, StepPlan, StepResult

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# tensors some checkpoints carry that no model reads: the rotary tables older HF llama exports saved
_NEVER_READ = re.compile(r"\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
_LISTED = 10


def check_consumed(source: CheckpointSource, cfg: ModelConfig) -> None:
    """After the model's load: every checkpoint tensor was read by some layer (or, under expert parallelism,
    left to the rank holding it), else a CheckpointError naming the files and tensors left over. A tensor
    nobody reads is a layer this engine does not build or a quantization tensor its method does not declare:
    serving without it would be silently wrong."""
    left = [n for n in source.unconsumed() if not _NEVER_READ.search(n)]
    if cfg.tie_word_embeddings:  # HF ties lm_head to the embedding and ignores a stored copy; so do we
        left = [n for n in left if n != "lm_head.weight"]
    if not left:
        return
    files = sorted({source.file_of(n) for n in left})
    more = f" and {len(left) - _LISTED} more" if len(left) > _LISTED else ""
    raise CheckpointError(
        ", ".join(files), None,
        f"{len(left)} tensors were not loaded by any layer: {left[:_LISTED]}{more}. The {cfg.architecture} model or "
        f"the quantization format does not know them: check --quantization, or report the checkpoint",
    )


def _on_compute(method):
    """Run the method on the worker's compute thread (Worker._compute) and wait for it. Once the step channel is
    open its loop holds that thread: what runs there then comes over the channel (`_handle`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self._channel is not None:
            raise RuntimeError(f"{method.__name__}: this worker's step channel holds its compute thread; "
                               "send the call over the channel")
        return self._compute.submit(method, self, *args, **kwargs).result()

    return run


class Worker:
    """One TP rank. Created as a Ray actor by cluster/replica.py; plain class so tests can run it in-process."""

    def __init__(
        self,
        model_path: str,
        device: str,
        dtype: str,
        quantization: str | None,
        rank: int,
        tp_size: int,
        enable_expert_parallel: bool = False,
        gguf_dequantize: bool = False,
    ):
        self.enable_expert_parallel = enable_expert_parallel
        self.model_path, self.rank, self.tp_size = model_path, rank, tp_size
        self.backend = get_backend(device)
        self.gguf_dequantize = gguf_dequantize
        self.dtype = self.backend.default_dtype() if dtype == "auto" else _DTYPES[dtype]
        self.quantization = quantization
        self.model = None
        self.runner: ModelRunner | None = None
        self._channel: StepServer | None = None
        # every torch call of this rank on one thread (`_on_compute`): Ray's calls and the step channel's hand theirs
        # over. OpenMP gives each thread that opens a parallel region its own pool, and libgomp's threads, more of
        # them than cores, stop spinning between regions: a second such thread made a batch-1 step 7 -> 12 ms.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardserve-compute")

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    @_on_compute
    def init(self, master_addr: str, master_port: int, threads: int | None = None) -> dict:
        """Join the TP group and load this rank's shard; returns what was loaded."""
        if threads and self.backend.name == "cpu":
            torch.set_num_threads(threads)  # per OS thread: this one runs every torch call of the rank
        self.device = self.backend.setup(0)
        tp = init_tp_group(self.backend.dist_backend, self.rank, self.tp_size, master_addr, master_port)
        t0 = time.perf_counter()
        source, cfg = open_checkpoint(self.model_path)
        cfg.enable_expert_parallel = self.enable_expert_parallel
        quant = detect(self.model_path, self.quantization, gguf_dequantize=self.gguf_dequantize)
        quant.bind(source)
        model = model_class(cfg.architecture)(cfg, quant, tp, self.backend.ops, self.dtype)
        model.load(source, progress=self._progress)
        check_consumed(source, cfg)
        self.model = model.to(self.device)
        del source  # unmaps the checkpoint; then hand the load's freed temporaries back to the OS
        _release_free_memory()
        self.cfg = cfg
        return {
            "rank": self.rank,
            "device": self.backend.name,  # the op table (the npu one runs host tensors under the emulation)
            "dist_backend": self.backend.dist_backend,
            "architecture": cfg.architecture,
            "quantization": quant.name,
            "load_s": round(time.perf_counter() - t0, 2),
            "pid": os.getpid(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),  # of this compute thread (Ray's workers run at 15 unless told)
        }

    def _progress(self, done: int, total: int) -> None:
        """After each decoder layer: its decoding temporaries go back to the OS (else they pile up in the heap:
        the peak of a kept-quantized load), and each rank logs a quarter at a time (a worker actor's log reaches
        the driver's terminal through Ray)."""
        _release_free_memory()
        if done == total or done % max(1, total // 4) == 0:
            _log_to_stderr()
            logger.info("rank %d/%d loading %s: layer %d/%d", self.rank, self.tp_size, os.path.basename(self.model_path),
                        done, total)

    def kv_block_bytes(self, block_size: int) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.cfg.num_layers * block_size * self.model.kv_heads_local() * self.cfg.head_dim * itemsize

    @_on_compute  # a device's memory query on the thread that set the device (per thread on CUDA and NPU)
    def kv_cache_budget(self, mem_fraction_static: float, cpu_gb: float) -> int:
        return self.backend.kv_cache_budget(mem_fraction_static, cpu_gb)

    @_on_compute
    def init_cache(self, num_blocks: int, block_size: int) -> int:
        shape = (num_blocks, block_size, self.model.kv_heads_local(), self.cfg.head_dim)
        zeros = functools.partial(self.backend.zeros, shape, self.dtype, self.device)
        caches = [(zeros(), zeros()) for _ in range(self.cfg.num_layers)]
        self.runner = ModelRunner(self.model, caches, block_size, self.device)
        return num_blocks

    @_on_compute
    def execute(self, plan: StepPlan) -> StepResult | None:
        return self._execute(plan)

    def _execute(self, plan: StepPlan) -> StepResult | None:
        t0 = time.perf_counter()
        result = self.runner.execute(plan)
        if result is not None:
            result.forward_s = time.perf_counter() - t0
        return result

    def open_step_channel(self, host: str) -> tuple[tuple[str, int], bytes]:
        """Listen for the replica's step channel (workers/channel.py) on `host`: its address and key. Its loop
        runs on the compute thread from now on: each step plan (or score) that arrives runs where it arrived."""
        if self._channel is not None:
            raise RuntimeError("this worker's step channel is open already: a replica drives it")
        self._channel = StepServer(host, self._handle, start=self._compute.submit)
        return self._channel.address, self._channel.key

    def _handle(self, message: StepPlan | ScoreCall):
        if isinstance(message, StepPlan):
            return self._execute(message)
        if isinstance(message, ScoreCall):
            return self._score(message.token_ids)
        raise TypeError(f"the step channel carries StepPlan or ScoreCall, not {type(message).__name__}")

    @_on_compute
    def score(self, token_ids: list[int]):
        """Teacher-forced logits [T, vocab] (rank 0; None elsewhere): for evaluation and equivalence tests."""
        return self._score(token_ids)

    def _score(self, token_ids: list[int]):
        return self.runner.score(token_ids)

    def ping(self) -> int:
        return self.rank


@functools.cache
def _log_to_stderr() -> None:
    """Inside a Ray worker process nothing configures logging (INFO would be dropped): give ours a stderr handler,
    unless logging is configured already (the CLI's driver, pytest)."""
    ours = logging.getLogger("shardserve")
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


def _release_free_memory() -> None:
    """glibc keeps freed heap pages (the load's decoded blocks) resident until asked: malloc_trim returns them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
