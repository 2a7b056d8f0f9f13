"""Starting an engine on Ray: attach to or start Ray, pick the device from the cluster, create the router."""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import ray

from shardserve.cluster.config import EngineConfig

logger = logging.getLogger(__name__)


# Logical CPUs of a local Ray we start: Ray only counts them (TP ranks on CPU share the real cores, gloo), so
# give enough that any TP group this machine can run, and a second engine beside the first, finds its bundles.
LOCAL_RAY_MIN_CPUS = 64
# where a server's named router lives, so that tools on the cluster find it: ray.get_actor(name, namespace=...)
RAY_NAMESPACE = "shardserve"
# Ray starts worker processes at nice 15 (its worker_niceness), below the driver, the raylet and its agents: on a
# small host each of their wake-ups preempts a rank's compute threads in the middle of a parallel region. The
# engine's processes are the point of a serving cluster: a local Ray we start runs them at nice 0 (SmolLM2 Q4_1,
# 2 cores, 8 streamed 64-token requests, interleaved runs: 0.78-0.92x the time a token at nice 15, median 0.88x).
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


def init_ray(cfg: EngineConfig) -> None:
    """Join the cluster named by --ray-address or RAY_ADDRESS (set inside `ray job submit`), else start a
    private local one: never join whatever cluster happens to run on the machine."""
    if ray.is_initialized():
        return
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address, namespace=RAY_NAMESPACE, log_to_driver=True)
        return
    need = cfg.tp_size * cfg.dp_size * cfg.threads_per_worker()
    ray.init(address="local", num_cpus=max(LOCAL_RAY_MIN_CPUS, os.cpu_count() or 1, need), namespace=RAY_NAMESPACE,
             include_dashboard=False, log_to_driver=True, _system_config=LOCAL_RAY_SYSTEM_CONFIG)


def cluster_device(requested: str) -> str:
    """'auto' against the cluster's resources (the driver may sit on a node without accelerators)."""
    if requested != "auto":
        from shardserve.workers.device import resolve_device  # with torch: not before Ray starts

        return resolve_device(requested)
    resources = ray.cluster_resources()
    if resources.get("NPU", 0) > 0:
        return "npu"
    if resources.get("GPU", 0) > 0:
        return "cuda"
    return "cpu"


def build_replica(cfg: EngineConfig, tokenizer, index: int, model_cfg):
    """Inside the router actor: create and load one replica, size its KV cache, make its engine core. `tokenizer`
    may be a Future of it, waited for once the replica is loaded.

    A replica that fails to load gives back its workers and placement group before the error propagates."""
    from shardserve.cluster.replica import Replica
    from shardserve.router.engine import EngineCore

    replica = Replica(cfg, index)
    try:
        replica.load()
        logger.info("replica %d loaded: %s", index, replica.worker_info)
        blocks = replica.init_cache(cfg.num_kv_blocks)
        if isinstance(tokenizer, Future):  # the router's, read while this replica's workers started and loaded
            tokenizer = tokenizer.result()
    except BaseException:
        replica.shutdown()
        raise
    max_len = serving_context(cfg, model_cfg, blocks)
    return replica, EngineCore(tokenizer, blocks, cfg.block_size, max_len, model_cfg.vocab_size, cfg)


def serving_context(cfg: EngineConfig, model_cfg, num_blocks: int) -> int:
    """The context served: --context-length or the model's, clamped to what the KV cache holds (a 32k-context
    model on a small CPU cache would otherwise refuse every request that leaves max_tokens unset)."""
    max_len = min(cfg.max_model_len or model_cfg.max_position, model_cfg.max_position)
    cache_tokens = num_blocks * cfg.block_size
    if cache_tokens < max_len:
        logger.warning(
            "the KV cache holds %d tokens (%d blocks of %d), less than the model's context of %d: serving a "
            "context of %d tokens; raise --kv-cache-memory-gb (CPU) or --mem-fraction-static to serve more",
            cache_tokens, num_blocks, cfg.block_size, max_len, cache_tokens,
        )
        max_len = cache_tokens
    return max_len


def _checked_model_config(cfg: EngineConfig):
    from shardserve.workers.loader import open_checkpoint
    from shardserve.workers.models.config import check_tp

    _, model_cfg = open_checkpoint(cfg.model_path)
    check_tp(model_cfg, cfg.tp_size, cfg.enable_expert_parallel)  # a clear refusal here, not a failure inside a worker
    return model_cfg


def load_tokenizer(model_path: str):
    from shardserve.workers.loader.gguf_source import find_gguf_file
    from shardserve.workers.loader.tokenizer import Tokenizer

    gguf_file = find_gguf_file(model_path)
    return Tokenizer.from_gguf(gguf_file) if gguf_file else Tokenizer.from_hf_dir(model_path)


def start_router(cfg: EngineConfig, name: str | None = None, detached: bool = False, here: bool = False):
    """The router actor (no resources of its own), started and loaded; returns (handle, info). `detached`: it
    outlives the process that starts it (Serve's ingress replicas share it; the last to leave shuts it down).
    `here`: on this process's node (it serves HTTP there, where the caller was asked to listen).

    A start that fails (a worker's load raises, no room to place) releases what it took before raising."""
    from shardserve.router.router import Router

    # The checkpoint's config is read (its header parsed, no torch: ~1 s for the default GGUF on 2 cores) while Ray
    # starts; ray.init stays on the main thread (the processes it starts die with the thread that started them).
    with ThreadPoolExecutor(max_workers=1) as pool:
        checked = pool.submit(_checked_model_config, cfg)
        init_ray(cfg)
        model_cfg = checked.result()
    cfg.device = cluster_device(cfg.device)
    # a named router lives in our namespace whichever job starts it (a Serve replica's is "serve")
    namespace = RAY_NAMESPACE if name else None
    placement = {}
    if here:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(Router).options(num_cpus=0, name=name, namespace=namespace, max_concurrency=1000,
                                       lifetime="detached" if detached else None, **placement)
    # the model config read above travels with the builder: the router need not parse the checkpoint again
    router = actor.remote(cfg, functools.partial(build_replica, model_cfg=model_cfg), load_tokenizer)
    try:
        info = ray.get(router.start.remote())
    except ray.exceptions.RayTaskError as e:  # the router has released its replicas; raise the cause itself
        ray.kill(router)
        raise e.as_instanceof_cause() from None
    except BaseException:
        ray.kill(router)
        raise
    return router, info
