"""The router actor: tokenizes, admits, and drives each replica's engine loop; streams deltas per request.

Failure: a replica whose step fails (a worker died, raised, or hung) stops serving at once; its requests
move to a serving replica (or wait for this one) and are recomputed from their prompt and the tokens already
streamed, once; the replica is torn down (actors and placement group) and rebuilt in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shardserve.router.affinity import RoutedPrefixes, choose
from shardserve.router.block_manager import prompt_block_hashes
from shardserve.router.engine import EngineCore
from shardserve.router.outputs import Delta
from shardserve.router.sampling_params import RequestError, SamplingParams
from shardserve.router.sequence import Sequence

logger = logging.getLogger(__name__)

REBUILD_ATTEMPTS = 3  # a replica that fails to rebuild this many times in a row stays down
REBUILD_BACKOFF_S = 2.0  # doubled after each failed attempt
HEALTH_CHECK_S = 5.0  # an idle replica pings its workers this often


class Unavailable(RequestError):
    """No replica can serve now (all are being rebuilt, or down), or the queue is full: HTTP 503."""

    status = 503
    retry_after_s = 1


@dataclass
class _ReplicaLoop:
    index: int
    replica: object  # cluster.replica.Replica (`submit(plan)`, `async result(submitted)`, `async score`, `shutdown`, `ping`)
    core: EngineCore
    state: str = "serving"  # serving | rebuilding | down
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None  # the step loop
    rebuild: asyncio.Task | None = None
    held: dict[str, list[Sequence]] = field(default_factory=dict)  # requests waiting for the rebuild
    routed: RoutedPrefixes = field(init=False)  # prompt blocks routed here (prefix affinity)
    routed_by: dict[str, int] = field(default_factory=lambda: {"prefix": 0, "load": 0})  # new requests routed here

    def __post_init__(self) -> None:
        self.forget_prefixes()

    def forget_prefixes(self) -> None:
        """A new replica (at start or rebuilt) holds no cached prefix."""
        self.routed = RoutedPrefixes(len(self.core.blocks.blocks))

    @property
    def serving(self) -> bool:
        return self.state == "serving"


class Router:
    """Owns the replicas (TP worker groups) and their engine cores. Run as an async Ray actor.

    `build_replica(cfg, tokenizer, index) -> (replica, core)` creates and loads one replica (blocking; run in
    a thread), at start and on every rebuild."""

    def __init__(self, cfg, build_replica, tokenizer_factory):
        self.cfg = cfg
        # read while the first replica's workers start and load (they need no tokenizer): `tokenizer` waits for it
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardserve-tokenizer")
        self._tokenizer = reader.submit(tokenizer_factory, cfg.model_path)
        reader.shutdown(wait=False)  # the read runs on; its thread ends with it
        self._build = build_replica
        self.loops: list[_ReplicaLoop] = []
        self.streams: dict[str, asyncio.Queue] = {}
        self.owner: dict[str, _ReplicaLoop] = {}
        self.retried: set[str] = set()  # requests already moved once after a replica failure
        self.info: dict = {}
        self.stats_failures = {"replica_failures": 0, "requests_retried": 0, "replica_rebuilds": 0}
        self.users: dict[str, str] = {}  # the ingress replicas sharing this engine (Ray Serve): actor name -> namespace
        self._http = None  # serve_http's server

    @property
    def tokenizer(self):
        return self._tokenizer.result()

    async def start(self) -> dict:
        """Create and load the replicas one by one, then start their step loops; a failure releases them all."""
        built = []
        try:
            for i in range(self.cfg.dp_size):
                built.append(await self._run_blocking(self._build, self.cfg, self._tokenizer, i))
        except BaseException:
            for replica, _ in built:
                replica.shutdown()
            raise
        for i, (replica, core) in enumerate(built):
            loop = _ReplicaLoop(i, replica, core)
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
            "workers": [lp.replica.worker_info for lp in self.loops],
        }
        return self.info

    @staticmethod
    async def _run_blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

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

    def _choose(self) -> _ReplicaLoop | None:
        """The least-loaded serving replica; None while none serves."""
        serving = [lp for lp in self.loops if lp.serving]
        return min(serving, key=lambda lp: len(lp.core.requests)) if serving else None

    def _serving(self) -> list[_ReplicaLoop]:
        """The replicas a new request or score may go to; Unavailable (503) while none serves."""
        serving = [lp for lp in self.loops if lp.serving]
        if not serving:
            raise Unavailable("no replica can serve now (being rebuilt after a worker failure); retry shortly")
        return serving

    def _route(self, ids: list[int]) -> tuple[_ReplicaLoop, list[int], str]:
        """A new request's replica: the serving one holding the longest prefix of its prompt, else the least
        loaded (router/affinity.py); also the prompt's block hashes and the reason, to record once admitted."""
        serving = self._serving()
        hashes = []
        if len(serving) > 1 and self.cfg.enable_prefix_caching:
            hashes = prompt_block_hashes(ids, self.cfg.block_size)
        matched = [max(lp.routed.matched(hashes), lp.core.blocks.cached_blocks(hashes)) for lp in serving]
        choice = choose([len(lp.core.requests) for lp in serving], matched)
        return serving[choice.index], hashes, "prefix" if choice.by_prefix else "load"

    async def generate(
        self,
        request_id: str,
        params: SamplingParams,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the request's deltas until every one of its n sequences finishes."""
        ids, _ = self.encode_prompt(prompt, messages)
        loop, hashes, reason = self._route(ids)
        bound = self.cfg.max_queued_requests
        if bound is not None and self._queued() >= bound:
            raise Unavailable(f"the server is overloaded: {bound} sequences wait to run already; retry shortly")
        queue: asyncio.Queue = asyncio.Queue()
        loop.core.add_request(request_id, ids, params)  # raises RequestError before anything is queued
        loop.routed.record(hashes)
        loop.routed_by[reason] += 1
        self.streams[request_id], self.owner[request_id] = queue, loop
        loop.wakeup.set()
        remaining = params.n
        timeout = self.cfg.request_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while remaining:
                try:
                    delta: Delta = await asyncio.wait_for(queue.get(), self._left(deadline))
                except asyncio.TimeoutError:  # ends every unfinished sequence with an error delta, queued
                    self.abort(request_id, error=f"the request timed out after {timeout:g}s (--request-timeout)")
                    deadline = None
                    continue
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            if remaining:  # the consumer went away: free its KV blocks now
                self.abort(request_id)
            self.streams.pop(request_id, None)
            self.owner.pop(request_id, None)
            self.retried.discard(request_id)

    async def complete(self, request_id: str, params: SamplingParams, prompt=None, messages=None) -> list[Delta]:
        """Non-streaming: all deltas of the request at once."""
        return [d async for d in self.generate(request_id, params, prompt, messages)]

    def _queued(self) -> int:
        """Sequences admitted and not yet running, over all replicas (requests held for a rebuild included)."""
        return sum(len(lp.core.scheduler.waiting) + len(lp.held) for lp in self.loops)

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())

    def abort(self, request_id: str, error: str | None = None) -> None:
        """End the request's unfinished sequences: "abort", or "error" with the reason when `error` is given."""
        loop = self.owner.get(request_id)
        if loop is None:
            return
        held = loop.held.pop(request_id, None)
        if held is not None:
            deltas = [Delta(request_id, s.index, "", [], finish_reason="abort") for s in held if s.finish_reason is None]
            for seq in held:
                seq.finish_reason = seq.finish_reason or "abort"
        else:
            deltas = loop.core.abort(request_id)
            loop.wakeup.set()  # the freed blocks may admit a waiting sequence
        for d in deltas:
            if error is not None:
                d.finish_reason, d.error = "error", error
            self._emit(d)

    def _emit(self, delta: Delta) -> None:
        queue = self.streams.get(delta.request_id)
        if queue is not None:
            queue.put_nowait(delta)

    # ---- the step loop ----------------------------------------------------------------------
    async def _run(self, loop: _ReplicaLoop) -> None:
        """Keep up to two steps in flight: step N+1 is sent while step N runs (the worker fills in the tokens step N
        samples, workers/step.py PENDING), so this loop's work (results, deltas, the next plan) and the step's round
        trip overlap the forward. A step's time is from the previous result (or its own send, when none was in
        flight) to its result: what the workers deliver, the router's work included where it did not overlap."""
        core = loop.core
        ahead = 1 if self.cfg.disable_overlap_schedule else 2
        inflight: deque[asyncio.Future] = deque()
        since = 0.0
        try:
            while loop.serving:
                while len(inflight) < ahead and core.has_work():
                    plan = core.schedule()
                    if plan is None:
                        break
                    if not inflight:
                        since = time.perf_counter()
                    inflight.append(loop.replica.submit(plan))
                if not inflight:
                    await self._idle(loop)
                    continue
                result = await loop.replica.result(inflight[0])
                inflight.popleft()
                now = time.perf_counter()
                core.stats["step_seconds"] += now - since
                core.stats["forward_seconds"] += result.forward_s
                since = now
                for delta in core.process(result):
                    self._emit(delta)
        except Exception as e:  # a dead, raising or hung worker: never hang its requests
            logger.exception("replica %d: a step or health check failed", loop.index)
            self._replica_failed(loop, f"{type(e).__name__}: {e}")
        finally:
            for submitted in inflight:  # stopped serving with steps in flight: nobody waits for their results
                submitted.cancel()

    async def _idle(self, loop: _ReplicaLoop) -> None:
        """Wait for work; every HEALTH_CHECK_S without any, check that the workers are alive."""
        loop.wakeup.clear()
        try:
            await asyncio.wait_for(loop.wakeup.wait(), timeout=HEALTH_CHECK_S)
        except asyncio.TimeoutError:
            await loop.replica.ping()

    def _replica_failed(self, loop: _ReplicaLoop, cause: str) -> None:
        """Stop serving on `loop`, move its requests (once each), and rebuild it in the background."""
        loop.state = "rebuilding"
        self.stats_failures["replica_failures"] += 1
        for request_id, seqs in loop.core.take_requests().items():
            if request_id in self.retried:
                self._fail(request_id, seqs, f"failed again after a retry (replica {loop.index}): {cause}")
                continue
            self.retried.add(request_id)
            self.stats_failures["requests_retried"] += 1
            self._place(request_id, seqs, fallback=loop)
        loop.rebuild = asyncio.create_task(self._rebuild(loop, cause))

    def _place(self, request_id: str, seqs: list[Sequence], fallback: _ReplicaLoop) -> None:
        """Hand a moved request to a serving replica, else hold it for `fallback`'s rebuild."""
        target = self._choose()
        if target is None:
            fallback.held[request_id] = seqs
            self.owner[request_id] = fallback
            return
        target.core.adopt(request_id, seqs)
        self.owner[request_id] = target
        target.wakeup.set()

    def _fail(self, request_id: str, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                self._emit(Delta(request_id, seq.index, "", [], finish_reason="error", error=message))

    async def _rebuild(self, loop: _ReplicaLoop, cause: str) -> None:
        """Release the failed replica, then build a new one (a few attempts, with backoff)."""
        try:
            await self._run_blocking(loop.replica.shutdown)
        except Exception:  # its actors may be gone already; the new group must not wait on that
            logger.warning("replica %d: releasing the failed workers raised", loop.index, exc_info=True)
        delay = REBUILD_BACKOFF_S
        for attempt in range(1, REBUILD_ATTEMPTS + 1):
            if loop.state == "down":
                return
            logger.warning("replica %d: rebuilding (attempt %d/%d) after: %s", loop.index, attempt, REBUILD_ATTEMPTS, cause)
            try:
                replica, core = await self._run_blocking(self._build, self.cfg, self.tokenizer, loop.index)
            except Exception as e:
                logger.exception("replica %d: rebuild attempt %d failed", loop.index, attempt)
                cause = f"{type(e).__name__}: {e}"
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if loop.state == "down":  # shut down while it was being built: give it back at once
                await self._run_blocking(replica.shutdown)
                return
            loop.replica, loop.core = replica, core
            loop.forget_prefixes()
            break
        else:
            loop.state = "down"
            for request_id, seqs in loop.held.items():
                self._fail(request_id, seqs, f"replica {loop.index} could not be rebuilt: {cause}")
            loop.held.clear()
            return
        loop.state = "serving"
        self.info["workers"][loop.index] = loop.replica.worker_info
        self.stats_failures["replica_rebuilds"] += 1
        logger.info("replica %d: serving again (%s)", loop.index, loop.replica.worker_info)
        for request_id, seqs in loop.held.items():
            loop.core.adopt(request_id, seqs)
        loop.held.clear()
        loop.task = asyncio.create_task(self._run(loop))

    async def score(self, token_ids: list[int]):
        """Teacher-forced logits of a token sequence on a serving replica (evaluation, equivalence tests); its
        message follows the steps sent on the same channels, so their collectives never interleave."""
        loop = min(self._serving(), key=lambda lp: len(lp.core.requests))
        return await loop.replica.score(token_ids)

    # ---- the HTTP server, in this process (`shardserve serve`) --------------------------------
    async def serve_http(self, options) -> None:
        """Serve the OpenAI-compatible app (cluster/server.py) from this actor's process and event loop, over this
        object itself: no Ray call between a request and its engine. Returns once it accepts connections."""
        from shardserve.cluster.server import InProcessServer

        server = InProcessServer(self, options)
        await server.start()
        self._http = server

    async def wait_http(self) -> None:
        """Until the HTTP server has stopped (the driver watches this call: it also fails if this actor dies)."""
        await self._http.wait()

    async def stop_http(self) -> None:
        """Stop accepting requests, let those in flight finish within the grace period, close the server."""
        if self._http is not None:
            await self._http.stop()

    def shutdown(self) -> None:
        """Stop the step loops, fail what is in flight, and give back the workers and their placement groups
        (a rebuild under way gives its new replica back when it finishes)."""
        for lp in self.loops:
            lp.state = "down"
            if lp.task is not None:
                lp.task.cancel()
            for request_id, seqs in [*lp.core.take_requests().items(), *lp.held.items()]:
                self._fail(request_id, seqs, "the server is shutting down")
            lp.held.clear()
            if lp.rebuild is None or lp.rebuild.done():  # else the rebuild released the old one already
                lp.replica.shutdown()
        self.loops.clear()

    def attach(self, user: str, namespace: str) -> None:
        """An ingress replica (the named actor `user` in `namespace`) starts using this engine."""
        self.users[user] = namespace

    def detach(self, user: str) -> int:
        """An ingress replica stops; returns how many live replicas still use the engine (at 0, the caller shuts
        it down). Users whose actor is gone without detaching (a crash, a lost node) are forgotten here."""
        import ray

        self.users.pop(user, None)
        for name, namespace in list(self.users.items()):
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                del self.users[name]
        return len(self.users)

    def attached(self) -> list[str]:
        """The ingress replicas using this engine, the earliest first."""
        return list(self.users)

    # ---- introspection ----------------------------------------------------------------------
    def get_info(self) -> dict:
        return self.info

    def health(self) -> dict:
        """Each replica's state; `ok` while at least one serves."""
        states = [lp.state for lp in self.loops]
        return {"ok": "serving" in states, "replicas": states}

    def stats(self) -> dict:
        out = {"running": 0, "waiting": 0, "free_blocks": 0, "prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        out.update(self.stats_failures)
        out["replicas_serving"] = sum(lp.serving for lp in self.loops)
        for lp in self.loops:
            s = lp.core.scheduler
            out["running"] += len(s.running)
            out["waiting"] += len(s.waiting) + sum(len(seqs) for seqs in lp.held.values())
            out["free_blocks"] += lp.core.blocks.num_free
            for k in ("prefix_queries", "prefix_hits", "preemptions"):
                out[k] += getattr(lp.core.blocks.stats, k)
            for k, v in lp.core.stats.items():
                out[k] = out.get(k, 0) + v
        out["total_blocks"] = sum(len(lp.core.blocks.blocks) for lp in self.loops)
        out["routed"] = [dict(lp.routed_by) for lp in self.loops]  # per replica: new requests by prefix / by load
        for reason in ("prefix", "load"):
            out[f"routed_by_{reason}"] = sum(lp.routed_by[reason] for lp in self.loops)
        return out
