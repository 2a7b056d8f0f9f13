"""The router actor: tokenizes, admits, and drives each replica's engine loop; streams deltas per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shardserve.router.engine import EngineCore
from shardserve.router.outputs import Delta
from shardserve.router.sampling_params import RequestError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _ReplicaLoop:
    replica: object  # cluster.replica.Replica (anything with `async execute(plan)`)
    core: EngineCore
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Router:
    """Owns the replicas (TP worker groups) and their engine cores. Run as an async Ray actor."""

    def __init__(self, cfg, make_replicas, tokenizer_factory):
        self.cfg = cfg
        self.tokenizer = tokenizer_factory(cfg.model_path)
        self._replicas_spec = make_replicas
        self.loops: list[_ReplicaLoop] = []
        self.streams: dict[str, asyncio.Queue] = {}
        self.owner: dict[str, _ReplicaLoop] = {}
        self.info: dict = {}

    async def start(self) -> dict:
        """Create and load the replicas (blocking work off the event loop), then start their step loops."""
        built = await asyncio.get_running_loop().run_in_executor(None, self._replicas_spec, self.cfg, self.tokenizer)
        for replica, core in built:
            loop = _ReplicaLoop(replica, core)
            loop.task = asyncio.create_task(self._run(loop))
            self.loops.append(loop)
        core = self.loops[0].core
        self.info = {
            "model": self.cfg.model_name,
            "max_model_len": core.max_model_len,
            "num_kv_blocks": len(core.blocks.blocks),
            "block_size": core.blocks.block_size,
            "replicas": len(self.loops),
            "tp_size": self.cfg.tp_size,
            "workers": [getattr(lp.replica, "worker_info", None) for lp in self.loops],
        }
        return self.info

    # ---- requests ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | None, messages: list[dict] | None) -> tuple[list[int], str | None]:
        if messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError as e:
                raise RequestError(str(e), param="messages") from e
            return self.tokenizer.encode(text, add_special_tokens=False), text
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True), prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt), None
        raise RequestError("prompt must be a string or a list of token ids", param="prompt")

    async def generate(
        self,
        request_id: str,
        params: SamplingParams,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the request's deltas until every one of its n sequences finishes."""
        ids, _ = self.encode_prompt(prompt, messages)
        loop = min(self.loops, key=lambda lp: len(lp.core.requests))  # least-loaded replica
        queue: asyncio.Queue = asyncio.Queue()
        loop.core.add_request(request_id, ids, params)  # raises RequestError before anything is queued
        self.streams[request_id], self.owner[request_id] = queue, loop
        loop.wakeup.set()
        remaining = params.n
        try:
            while remaining:
                delta: Delta = await queue.get()
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            if remaining:  # the consumer went away: free its KV blocks now
                self.abort(request_id)
            self.streams.pop(request_id, None)
            self.owner.pop(request_id, None)

    async def complete(self, request_id: str, params: SamplingParams, prompt=None, messages=None) -> list[Delta]:
        """Non-streaming: all deltas of the request at once."""
        return [d async for d in self.generate(request_id, params, prompt, messages)]

    def abort(self, request_id: str) -> None:
        loop = self.owner.get(request_id)
        if loop is not None:
            for d in loop.core.abort(request_id):
                self._emit(d)

    def _emit(self, delta: Delta) -> None:
        queue = self.streams.get(delta.request_id)
        if queue is not None:
            queue.put_nowait(delta)

    # ---- the step loop ----------------------------------------------------------------------
    async def _run(self, loop: _ReplicaLoop) -> None:
        while True:
            plan = loop.core.schedule() if loop.core.has_work() else None
            if plan is None:
                loop.wakeup.clear()
                await loop.wakeup.wait()
                continue
            try:
                result = await loop.replica.execute(plan)
            except Exception as e:  # a dead worker: fail this replica's requests explicitly, never hang
                logger.exception("replica step failed")
                self._fail_all(loop, f"{type(e).__name__}: {e}")
                continue
            for delta in loop.core.process(result):
                self._emit(delta)

    def _fail_all(self, loop: _ReplicaLoop, message: str) -> None:
        for request_id in list(loop.core.requests):
            for d in loop.core.abort(request_id):
                d.finish_reason, d.error = "error", message
                self._emit(d)

    async def score(self, token_ids: list[int]):
        """Teacher-forced logits of a token sequence on the first replica (evaluation, equivalence tests)."""
        replica = self.loops[0].replica
        return await asyncio.get_running_loop().run_in_executor(None, replica.score, token_ids)

    def shutdown(self) -> None:
        """Stop the step loops, fail what is in flight, and give back the workers and their placement groups."""
        for lp in self.loops:
            if lp.task is not None:
                lp.task.cancel()
            self._fail_all(lp, "the server is shutting down")
            lp.replica.shutdown()
        self.loops.clear()

    # ---- introspection ----------------------------------------------------------------------
    def get_info(self) -> dict:
        return self.info

    def stats(self) -> dict:
        out = {"running": 0, "waiting": 0, "free_blocks": 0, "prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        for lp in self.loops:
            s = lp.core.scheduler
            out["running"] += len(s.running)
            out["waiting"] += len(s.waiting)
            out["free_blocks"] += lp.core.blocks.num_free
            for k in ("prefix_queries", "prefix_hits", "preemptions"):
                out[k] += getattr(lp.core.blocks.stats, k)
            for k, v in lp.core.stats.items():
                out[k] = out.get(k, 0) + v
        out["total_blocks"] = sum(len(lp.core.blocks.blocks) for lp in self.loops)
        return out
