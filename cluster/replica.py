"""A replica: one TP group of worker actors in one placement group, driven one step plan at a time."""

from __future__ import annotations

import asyncio
import logging
import pickle

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardserve.cluster.config import EngineConfig
from shardserve.workers.actor import Worker as WorkerActor
from shardserve.workers.channel import ChannelClosed, StepClient
from shardserve.workers.device import RAY_RESOURCES
from shardserve.workers.step import ScoreCall, StepPlan, StepResult

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A worker of the replica died, raised or hung mid-step: the replica is rebuilt, its requests retried."""


def bundle(cfg: EngineConfig, resource: str) -> dict[str, float]:
    threads = cfg.threads_per_worker()
    if resource == "CPU":
        return {"CPU": threads}
    return {resource: 1, "CPU": 1}


class Replica:
    """Places its workers from the Ray resource name of the device alone: the router that creates replicas
    never imports a device stack (a CPU head node has no torch_npu)."""

    def __init__(self, cfg: EngineConfig, index: int):
        self.cfg, self.index, self.device = cfg, index, cfg.device
        self.worker_info: list[dict] = []  # what each rank reported after loading (pid, load time, format)
        self.workers: list = []
        self.channels: list[StepClient] = []  # each rank's step channel, opened by init_cache
        self.node_id: str | None = None
        self.host: str | None = None  # the group's node address (rank 0's): gloo's master and the step channels'
        need = bundle(cfg, RAY_RESOURCES[cfg.device])
        # one node per TP group; Ray's scheduler puts each new group on the least used node that fits, so
        # replicas spread over nodes (tests/cluster/test_multinode.py: nodes that could each hold both)
        self.pg = placement_group([need] * cfg.tp_size, strategy="STRICT_PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"replica {index}: Ray could not place {cfg.tp_size} x {need} on one node "
                f"within {cfg.placement_timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}, "
                f"available: {ray.available_resources()}"
            )
        self.node_id = ray.util.placement_group_table(self.pg)["bundles_to_node_id"][0]
        opts = {"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0)}
        if "NPU" in need:
            opts["resources"] = {"NPU": need["NPU"]}
        actor = ray.remote(WorkerActor)  # torch-free here: the worker's process imports the model code
        self.workers = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r), **opts
            ).remote(
                cfg.model_path, self.device, cfg.dtype, cfg.quantization, r, cfg.tp_size, cfg.enable_expert_parallel,
                cfg.gguf_dequantize,
            )
            for r in range(cfg.tp_size)
        ]

    def load(self) -> list[dict]:
        """Join the process group and load every rank's shard (in parallel)."""
        self.host = self._get([self.workers[0].node_ip.remote()])[0]
        port = self._get([self.workers[0].free_port.remote()])[0]
        threads = self.cfg.threads_per_worker()
        self.worker_info = self._get([w.init.remote(self.host, port, threads) for w in self.workers])
        for info in self.worker_info:
            info["node_id"] = self.node_id  # STRICT_PACK: every rank on the group's node
        return self.worker_info

    def init_cache(self, num_blocks: int | None) -> int:
        if num_blocks is None:
            cfg = self.cfg
            block_bytes = max(self._get([w.kv_block_bytes.remote(cfg.block_size) for w in self.workers]))
            budgets = [w.kv_cache_budget.remote(cfg.mem_fraction_static, cfg.kv_cache_memory_gb) for w in self.workers]
            num_blocks = int(min(self._get(budgets)) // block_bytes)
        if num_blocks < 1:
            raise RuntimeError(f"replica {self.index}: no room for a single KV block; raise the KV cache size")
        self._get([w.init_cache.remote(num_blocks, self.cfg.block_size) for w in self.workers])
        # each rank listens on the group's node address (STRICT_PACK: all on one node), as gloo does
        opened = self._get([w.open_step_channel.remote(self.host) for w in self.workers])
        self.channels = [StepClient(address, key) for address, key in opened]
        return num_blocks

    def _get(self, refs: list) -> list:
        try:
            return ray.get(refs, timeout=self.cfg.worker_timeout_s)
        except ray.exceptions.RayActorError as e:
            raise WorkerDiedError(f"replica {self.index}: a worker died: {e}") from e

    async def _gather(self, refs: list, what: str) -> list:
        """Every rank's answer; the first failure (a dead actor, a raised exception, or a rank silent past
        worker_timeout_s, e.g. blocked in a collective its dead peer never joins) raises WorkerDiedError."""
        try:
            return await self.result(asyncio.gather(*refs), what)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise WorkerDiedError(f"replica {self.index}: {what} failed on a worker: {e}") from e

    def submit(self, message: StepPlan | ScoreCall, what: str = "step") -> asyncio.Future:
        """Send one step (or score) to every rank over the step channels (workers/channel.py), at once: the message
        pickled once, sent to every rank; returns the future of rank 0's result. A rank whose channel closes (its
        process died) or whose step raised fails it at once with WorkerDiedError. Steps may be submitted before
        earlier ones return (each rank runs them in order); `result` waits for one with the timeout."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            replies = [c.send(data) for c in self.channels]
        except ChannelClosed as e:
            raise WorkerDiedError(f"replica {self.index}: {what} failed on a worker: {e}") from e
        return asyncio.ensure_future(self._first(replies, what))

    async def _first(self, replies: list[asyncio.Future], what: str):
        try:
            await asyncio.wait(replies, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for reply in replies:
                reply.cancel()  # given up on (the caller's timeout) or already failed: its reply is skipped
        for reply in replies:
            if reply.done() and not reply.cancelled() and reply.exception() is not None:
                raise WorkerDiedError(f"replica {self.index}: {what} failed on a worker: {reply.exception()}")
        return replies[0].result()

    async def result(self, submitted: asyncio.Future, what: str = "step"):
        """`submit`'s result; a rank silent past worker_timeout_s from now (hung, or blocked in a collective a dead
        peer never joins) raises WorkerDiedError. Call it for the oldest step in flight: the clock of a later one
        starts once those before it have returned."""
        try:
            return await asyncio.wait_for(submitted, timeout=self.cfg.worker_timeout_s)
        except asyncio.TimeoutError as e:
            raise WorkerDiedError(f"replica {self.index}: {what} hung for {self.cfg.worker_timeout_s:.0f}s") from e

    async def execute(self, plan: StepPlan) -> StepResult:
        """One step, waited for."""
        return await self.result(self.submit(plan))

    async def score(self, token_ids: list[int]):
        """Rank 0's teacher-forced logits, every rank running the forward: over the channels, after the steps sent."""
        return await self.result(self.submit(ScoreCall(list(token_ids)), "score"), "score")

    async def ping(self) -> None:
        """Every rank answers (an idle replica's dead worker is found before a request meets it)."""
        await self._gather([w.ping.remote() for w in self.workers], "health check")

    def shutdown(self) -> None:
        """Kill the workers (a rank blocked in a collective included) and give back the placement group."""
        for c in self.channels:
            c.close()
        self.channels = []
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.pg is not None:  # idempotent: a rebuild and a shutdown may both release it
            remove_placement_group(self.pg)
            self.pg = None
