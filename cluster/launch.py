"""Starting an engine on Ray: attach to or start Ray, pick the device from the cluster, create the router."""

from __future__ import annotations

import functools
import logging
import os

import ray

from shardserve.cluster.config import EngineConfig
from shardserve.workers.device import resolve_device

logger = logging.getLogger(__name__)


def init_ray(cfg: EngineConfig) -> None:
    """Join the cluster named by --ray-address or RAY_ADDRESS (set inside `ray job submit`), else start a
    private local one: never join whatever cluster happens to run on the machine."""
    if ray.is_initialized():
        return
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address, log_to_driver=True)
        return
    cores = os.cpu_count() or 1
    # Logical CPUs: every TP rank needs a bundle even where ranks outnumber cores (gloo ranks share them).
    need = cfg.tp_size * cfg.dp_size * cfg.threads_per_worker()
    ray.init(address="local", num_cpus=max(cores, need), include_dashboard=False, log_to_driver=True)


def cluster_device(requested: str) -> str:
    """'auto' against the cluster's resources (the driver may sit on a node without accelerators)."""
    if requested != "auto":
        return resolve_device(requested)
    resources = ray.cluster_resources()
    if resources.get("NPU", 0) > 0:
        return "npu"
    if resources.get("GPU", 0) > 0:
        return "cuda"
    return "cpu"


def build_replicas(cfg: EngineConfig, tokenizer, model_cfg) -> list:
    """Inside the router actor: create and load every replica, size its KV cache, make its engine core."""
    from shardserve.cluster.replica import Replica
    from shardserve.router.engine import EngineCore

    max_len = min(cfg.max_model_len or model_cfg.max_position, model_cfg.max_position)
    replicas = [Replica(cfg, i) for i in range(cfg.dp_size)]
    out = []
    for replica in replicas:
        replica.worker_info = replica.load()
        logger.info("replica %d loaded: %s", replica.index, replica.worker_info)
        blocks = replica.init_cache(cfg.num_kv_blocks)
        out.append((replica, EngineCore(tokenizer, blocks, cfg.block_size, max_len, model_cfg.vocab_size, cfg)))
    return out


def load_tokenizer(model_path: str):
    from shardserve.workers.loader.gguf_source import find_gguf_file
    from shardserve.workers.loader.tokenizer import Tokenizer

    gguf_file = find_gguf_file(model_path)
    return Tokenizer.from_gguf(gguf_file) if gguf_file else Tokenizer.from_hf_dir(model_path)


def start_router(cfg: EngineConfig, name: str | None = None):
    """The router actor (no resources of its own), started and loaded; returns (handle, info)."""
    from shardserve.router.router import Router
    from shardserve.workers.distributed import check_tp
    from shardserve.workers.loader import open_checkpoint

    _, model_cfg = open_checkpoint(cfg.model_path)
    check_tp(model_cfg, cfg.tp_size, cfg.enable_expert_parallel)  # a clear refusal here, not a failure inside a worker
    init_ray(cfg)
    cfg.device = cluster_device(cfg.device)
    actor = ray.remote(Router).options(num_cpus=0, name=name, max_concurrency=1000)
    # the model config read above travels with the builder: the router need not parse the checkpoint again
    router = actor.remote(cfg, functools.partial(build_replicas, model_cfg=model_cfg), load_tokenizer)
    info = ray.get(router.start.remote())
    return router, info
