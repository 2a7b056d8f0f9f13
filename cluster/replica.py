"""A replica: one TP group of worker actors in one placement group, driven one step plan at a time."""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardserve.cluster.config import EngineConfig
from shardserve.workers.device import get_backend
from shardserve.workers.step import StepPlan, StepResult
from shardserve.workers.worker import Worker

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A worker of the replica failed mid-step; its requests are failed explicitly."""


def bundle(cfg: EngineConfig, resource: str) -> dict[str, float]:
    threads = cfg.threads_per_worker()
    if resource == "CPU":
        return {"CPU": threads}
    return {resource: 1, "CPU": 1}


class Replica:
    def __init__(self, cfg: EngineConfig, index: int):
        self.cfg, self.index = cfg, index
        self.worker_info: list[dict] = []  # what each rank reported after loading (pid, load time, format)
        backend = get_backend(cfg.device)
        self.device = backend.name
        need = bundle(cfg, backend.ray_resource)
        self.pg = placement_group([need] * cfg.tp_size, strategy="STRICT_PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"replica {index}: Ray could not place {cfg.tp_size} x {need} on one node "
                f"within {cfg.placement_timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
            )
        opts = {"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0)}
        if "NPU" in need:
            opts["resources"] = {"NPU": need["NPU"]}
        actor = ray.remote(Worker)
        self.workers = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r), **opts
            ).remote(
                cfg.model_path, self.device, cfg.dtype, cfg.quantization, r, cfg.tp_size, cfg.enable_expert_parallel,
                cfg.cpu_int4_kernel,
            )
            for r in range(cfg.tp_size)
        ]

    def load(self) -> list[dict]:
        """Join the process group and load every rank's shard (in parallel)."""
        addr = ray.get(self.workers[0].node_ip.remote())
        port = ray.get(self.workers[0].free_port.remote())
        threads = self.cfg.threads_per_worker()
        return self._get([w.init.remote(addr, port, threads) for w in self.workers])

    def init_cache(self, num_blocks: int | None) -> int:
        if num_blocks is None:
            cfg = self.cfg
            block_bytes = max(self._get([w.kv_block_bytes.remote(cfg.block_size) for w in self.workers]))
            budgets = [w.kv_cache_budget.remote(cfg.mem_fraction_static, cfg.kv_cache_memory_gb) for w in self.workers]
            num_blocks = int(min(self._get(budgets)) // block_bytes)
        self._get([w.init_cache.remote(num_blocks, self.cfg.block_size) for w in self.workers])
        return num_blocks

    def _get(self, refs: list) -> list:
        try:
            return ray.get(refs, timeout=self.cfg.worker_timeout_s)
        except ray.exceptions.RayActorError as e:
            raise WorkerDiedError(f"replica {self.index}: a worker died: {e}") from e

    async def execute(self, plan: StepPlan) -> StepResult:
        ref = ray.put(plan)  # one copy in the object store, read by every rank
        refs = [w.execute.remote(ref) for w in self.workers]
        try:
            results = await asyncio.gather(*refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise WorkerDiedError(f"replica {self.index}: step failed on a worker: {e}") from e
        return results[0]

    def score(self, token_ids: list[int]):
        return self._get([w.score.remote(token_ids) for w in self.workers])[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
