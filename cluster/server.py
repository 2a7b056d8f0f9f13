"""The OpenAI-compatible HTTP ingress (FastAPI): completions and chat completions, SSE streaming, models,
health, Prometheus metrics. Talks to the router actor; in one process (uvicorn), or as the Ray Serve deployment of
cluster/serve_app.py."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardserve.cluster.config import MAX_BODY_BYTES, HttpOptions
from shardserve.cluster.protocol import ChatCompletionRequest, CompletionRequest
from shardserve.router.outputs import Delta
from shardserve.router.sampling_params import RequestError, SamplingParams

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client still waits


def _error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(_error_body(status, message, param, kind), status_code=status)


class _ApiKey:
    """Refuses every route without the key but /health and, unless `metrics_auth`, /metrics (SGLang exempts both,
    so that probes and Prometheus need no secret). Plain ASGI, not `@app.middleware`: behind Starlette's
    BaseHTTPMiddleware an endpoint never sees its client disconnect (`Request.is_disconnected` stays false)."""

    def __init__(self, app, api_key: str, metrics_auth: bool = False):
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.open = {"/health"} if metrics_auth else {"/health", "/metrics"}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no timing oracle on the key
                response = error_response(401, "invalid or missing API key", kind="authentication_error")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _ServerErrors:
    """An unexpected exception answers an OpenAI-shaped 500, not Starlette's plain text, and is logged here once
    with its traceback (an `Exception` handler would be re-raised to the ASGI server and logged twice)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            logger.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=e)
            if started:  # too late for a status: the server closes the connection
                raise
            response = error_response(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            await response(scope, receive, send)


class _BodyLimit:
    """Refuses a body over `max_bytes` with an OpenAI-shaped 413, by its Content-Length or, for a chunked body,
    as it arrives. Reads the body whole before the app runs, then hands it on; later `receive` calls go to
    the client's own, so that a disconnect is still seen."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body exceeds this server's limit of {self.max_bytes} bytes", kind="invalid_request_error")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks = None
                first = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        if chunks is not None:
            first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return first
            return await receive()

        return await self.app(scope, replay, send)


def _param(loc) -> str | None:
    """A pydantic error location as the field's path, `messages[0].role`: no `body` head, no union members."""
    parts = ""
    for x in loc[1:]:
        if isinstance(x, int):
            parts += f"[{x}]"
        elif isinstance(x, str) and x.isidentifier() and x not in {"str", "int", "float", "bool", "list", "dict"}:
            parts += f".{x}" if parts else x
        else:
            break  # a union member's tag (`list[int]`, `function-after[...]`): the field is named already
    return parts or None


# request latency buckets (seconds), vLLM's for these histograms
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class _Metrics:
    """Ours (`shardserve_*`), and the names vLLM users already graph (`vllm:*`, labelled `model_name`)."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("shardserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("shardserve_generation_tokens", "tokens generated", registry=r)
        self.gauges = {
            k: Gauge(f"shardserve_{k}", f"router {k.replace('_', ' ')}", registry=r)
            for k in ("running", "waiting", "free_blocks", "total_blocks", "prefix_hits", "prefix_queries", "preemptions", "steps")
        }
        # summed over steps: each one's time as the workers deliver it, and rank 0's forward of it (the rest: the step
        # protocol and router work that did not overlap the forward)
        self.gauges["step_seconds"] = Gauge("shardserve_step_seconds", "seconds of steps, each from the previous result "
                                            "(or its own send) to its result", registry=r)
        self.gauges["forward_seconds"] = Gauge("shardserve_forward_seconds", "seconds rank 0 ran the steps' forward "
                                               "(logits and sampling included)", registry=r)
        self.routed = Gauge("shardserve_routed_requests", "new requests routed to each replica: by the longest cached "
                            "prefix of the prompt, or to the least loaded", ["replica", "reason"], registry=r)
        label = {"labelnames": ["model_name"], "registry": r}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "time to first token", buckets=_TTFT_BUCKETS, **label)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "time per output token after the first",
                              buckets=_TPOT_BUCKETS, **label)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "end-to-end request latency", buckets=_E2E_BUCKETS, **label)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prefill tokens processed", **label)
        self.generation_tokens = Counter("vllm:generation_tokens", "tokens generated", **label)
        self.router_gauges = {  # vLLM name -> f(router stats)
            "vllm:num_requests_running": lambda s: s.get("running", 0),
            "vllm:num_requests_waiting": lambda s: s.get("waiting", 0),
            "vllm:kv_cache_usage_perc": lambda s: 1 - s["free_blocks"] / s["total_blocks"] if s.get("total_blocks") else 0,
            "vllm:gpu_prefix_cache_hit_rate": lambda s: s["prefix_hits"] / s["prefix_queries"] if s.get("prefix_queries") else 0,
            "vllm:num_preemptions_total": lambda s: s.get("preemptions", 0),  # a gauge of the router's running count
        }
        self.vllm_gauges = {k: Gauge(k, k.split(":")[1].replace("_", " "), **label) for k in self.router_gauges}
        self.model_name = model_name

    def update(self, stats: dict) -> None:
        for k, g in self.gauges.items():
            g.set(stats.get(k, 0))
        for k, f in self.router_gauges.items():
            self.vllm_gauges[k].labels(self.model_name).set(f(stats))
        for i, by in enumerate(stats.get("routed", [])):
            for reason, n in by.items():
                self.routed.labels(str(i), reason).set(n)

    def finished(self, start: float, first: float | None, prompt_tokens: int, completion_tokens: int) -> None:
        """One answered request: its latencies (from the handler's start; `first`: when its first token came) and
        token counts."""
        end, m = time.monotonic(), self.model_name
        self.e2e.labels(m).observe(end - start)
        if first is not None:
            self.ttft.labels(m).observe(first - start)
            if completion_tokens > 1:
                self.tpot.labels(m).observe((end - first) / (completion_tokens - 1))
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)


def create_app(
    router, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, metrics_auth: bool = False
) -> FastAPI:
    app = FastAPI(title="shardserve", version="0.1.0")
    metrics = _Metrics(model_name)
    if api_key:
        app.add_middleware(_ApiKey, api_key=api_key, metrics_auth=metrics_auth)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_ServerErrors)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is then a byte offset, not a field
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        loc = _param(first.get("loc", []))
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "model_attributes_type" and loc is None:
            msg = "the body must be a JSON object (with Content-Type: application/json)"
        return error_response(400, f"{loc or 'body'}: {msg}", param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own 404/405 and FastAPI's body-parsing 400 (invalid UTF-8), in OpenAI's shape
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}", kind="not_found_error")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}")
        if exc.status_code == 400:  # FastAPI could not decode the body: not UTF-8, say
            return error_response(400, f"the body is not valid JSON text (UTF-8): {exc.detail}")
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        """200 while some replica serves; 503 while none can (all being rebuilt after a failure, or down)."""
        state = await router.health.remote()
        if not state["ok"]:
            return JSONResponse({"status": "unavailable", "replicas": state["replicas"]}, status_code=503)
        return {"status": "ok", "replicas": state["replicas"]}

    @app.get("/v1/models")
    async def models():
        info = await router.get_info.remote()
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "shardserve", "max_model_len": info["max_model_len"]}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        metrics.update(await router.stats.remote())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _check_model(model: str | None):
        if model not in (None, "", model_name):
            return error_response(404, f"model {model!r} does not exist; this server serves {model_name!r}", "model", "not_found_error")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (bad := _check_model(body.model)) is not None:
            return bad
        try:
            params, prompts = body.params(), body.prompts()
        except RequestError as e:
            return error_response(400, str(e), e.param)
        handler = _Handler(router, model_name, "text_completion", metrics)
        return await handler.run(request, params, [{"prompt": p} for p in prompts], body.stream, body.stream_options, body.echo)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if (bad := _check_model(body.model)) is not None:
            return bad
        try:
            params = body.params()
        except RequestError as e:
            return error_response(400, str(e), e.param)
        handler = _Handler(router, model_name, "chat.completion", metrics)
        return await handler.run(request, params, [{"messages": body.message_dicts()}], body.stream, body.stream_options)

    return app


class _Handler:
    """One HTTP request: fans its prompts out to the router, then answers in one body or as SSE.

    Every exit that is not a full answer (a refused prompt, a failed generation, a client gone, an exception)
    aborts all of the request's prompts, so that none keeps its KV blocks."""

    def __init__(self, router, model: str, kind: str, metrics: _Metrics):
        self.router, self.model, self.kind, self.metrics = router, model, kind, metrics
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.num_prompts = 0
        self.start, self.first = time.monotonic(), None  # the first token's arrival, for time to first token

    async def run(self, request, params: SamplingParams, inputs: list[dict], stream: bool, stream_options, echo=False):
        endpoint = "chat" if self.kind == "chat.completion" else "completions"
        response = await self._answer(request, params, inputs, stream, stream_options, echo)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _answer(self, request, params, inputs, stream, stream_options, echo) -> Response:
        # every prompt is submitted before any is awaited, so that the replica batches their prefills
        gens = [
            self.router.generate.options(num_returns="streaming").remote(f"{self.id}-{i}", params, **kw)
            for i, kw in enumerate(inputs)
        ]
        self.num_prompts = len(gens)
        try:
            # the first deltas raise a prompt's RequestError before any byte is sent
            firsts = await _while_connected(request, _first_deltas(gens))
            self.first = time.monotonic()
            streams = list(zip(gens, firsts))
            if stream:
                include_usage = bool(stream_options and stream_options.include_usage)
                sse = self._sse(streams, params.n, include_usage, _echoed(inputs, echo))
                return StreamingResponse(sse, media_type="text/event-stream")
            body = await _while_connected(request, self._collect(streams, params.n, _echoed(inputs, echo)))
            return JSONResponse(body)
        except RequestError as e:
            self._abort()
            status = getattr(e, "status", 400)  # the router's Unavailable is a 503
            response = error_response(status, str(e), e.param, "invalid_request_error" if status < 500 else "server_error")
            if hasattr(e, "retry_after_s"):
                response.headers["Retry-After"] = str(e.retry_after_s)
            return response
        except _GenerationFailed as e:
            self._abort()
            return error_response(500, f"generation failed: {e}", kind="server_error")
        except _ClientGone:
            self._abort()
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        for i in range(self.num_prompts):
            self.router.abort.remote(f"{self.id}-{i}")

    async def _collect(self, streams, n: int, echoed: list[str]) -> dict[str, Any]:
        by_choice: dict[int, list[Delta]] = {}
        async with aclosing(_merge(streams)) as deltas:
            async for p, d in deltas:
                if d.error:
                    raise _GenerationFailed(d.error)
                by_choice.setdefault(p * n + d.index, []).append(d)
        choices, completion_tokens = [], 0
        for index in sorted(by_choice):
            ds = by_choice[index]
            completion_tokens += sum(len(d.token_ids) for d in ds)
            text = echoed[index // n] + "".join(d.text for d in ds)
            choices.append(self._choice(index, text, ds[-1], _pairs(ds)))
        self.metrics.tokens.inc(completion_tokens)
        usage = _usage(streams, completion_tokens)
        self.metrics.finished(self.start, self.first, usage["prompt_tokens"], completion_tokens)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model, "choices": choices, "usage": usage}

    def _choice(self, index: int, text: str, last: Delta, pairs: list) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index, "finish_reason": last.finish_reason}
        if self.kind == "chat.completion":
            c["message"] = {"role": "assistant", "content": text}
            c["logprobs"] = _chat_logprobs(pairs) if pairs else None
        else:
            c["text"] = text
            c["logprobs"] = _completion_logprobs(pairs) if pairs else None
        c["stop_reason"] = last.stop_reason
        return c

    async def _sse(self, streams, n: int, include_usage: bool, echoed: list[str]) -> AsyncIterator[str]:
        completion_tokens, done = 0, False
        try:
            for index in range(len(streams) * n):
                if self.kind == "chat.completion":
                    role = {"role": "assistant", "content": ""}
                    yield self._event({"index": index, "delta": role, "finish_reason": None})
                elif echoed[index // n]:  # echo streams the prompt first, as vLLM does
                    yield self._event({"index": index, "text": echoed[index // n], "logprobs": None, "finish_reason": None})
            async with aclosing(_merge(streams)) as deltas:
                async for p, d in deltas:
                    completion_tokens += len(d.token_ids)
                    if d.error:
                        yield _error_event(f"generation failed: {d.error}")
                        return
                    yield self._event(self._stream_choice(p * n + d.index, d))
            usage = _usage(streams, completion_tokens)
            if include_usage:
                yield f"data: {json.dumps(self._chunk([], usage))}\n\n"
            yield "data: [DONE]\n\n"
            done = True
            self.metrics.finished(self.start, self.first, usage["prompt_tokens"], completion_tokens)
        except Exception as e:  # the status is sent already: the error goes in the stream
            logger.error("streaming %s failed", self.id, exc_info=e)
            yield _error_event(f"internal error: {type(e).__name__}: {e}")
        finally:
            # a client gone mid-stream: Starlette stops iterating us, so free its sequences here
            if not done:
                self._abort()
            self.metrics.tokens.inc(completion_tokens)

    def _stream_choice(self, index: int, d: Delta) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index, "finish_reason": d.finish_reason}
        if self.kind == "chat.completion":
            c["delta"] = {"content": d.text} if d.text or d.finish_reason is None else {}
            c["logprobs"] = _chat_logprobs(_pairs([d])) if d.logprobs else None
        else:
            c["text"] = d.text
            c["logprobs"] = _completion_logprobs(_pairs([d])) if d.logprobs else None
        return c

    def _event(self, choice: dict[str, Any]) -> str:
        return f"data: {json.dumps(self._chunk([choice]))}\n\n"

    def _chunk(self, choices: list, usage: dict | None = None) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk


class _GenerationFailed(Exception):
    """A prompt's generation ended with an error (its replica failed): the request answers 500."""


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer."""


async def _while_connected(request: Request, coro):
    """Run `coro` while the client waits; raise _ClientGone (cancelling it) once the client has disconnected.
    Streaming needs no such watch: Starlette's StreamingResponse listens for the disconnect itself."""
    task = asyncio.create_task(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone
    finally:
        task.cancel()


def _echoed(inputs: list[dict], echo: bool) -> list[str]:
    """The text each prompt's choices start with: the prompt itself under `echo` (checked at the door to be text)."""
    return [kw["prompt"] if echo else "" for kw in inputs]


def _usage(streams, completion_tokens: int) -> dict[str, int]:
    # each prompt counts once, however many choices it has (its first delta carries its tokens)
    prompt_tokens = sum(len(first.prompt_token_ids or []) for _, first in streams)
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _error_event(message: str) -> str:
    return f"data: {json.dumps(_error_body(500, message, kind='server_error'))}\n\n"


def _token_entry(v) -> dict[str, Any]:
    text = v.decoded_token or ""
    return {"token": text, "logprob": v.logprob, "bytes": list(text.encode())}


def _chat_logprobs(pairs: list[tuple[int, dict]]) -> dict[str, Any]:
    """OpenAI chat `logprobs.content`: the sampled token and the ranked alternatives, per position."""
    content = []
    for tid, pos in pairs:
        ranked = sorted((v for v in pos.values() if v.rank is not None), key=lambda v: v.rank)
        content.append({**_token_entry(pos[tid]), "top_logprobs": [_token_entry(v) for v in ranked]})
    return {"content": content}


def _completion_logprobs(pairs: list[tuple[int, dict]]) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists of tokens, their logprobs and top alternatives."""
    return {
        "tokens": [pos[tid].decoded_token for tid, pos in pairs],
        "token_logprobs": [pos[tid].logprob for tid, pos in pairs],
        "top_logprobs": [{v.decoded_token: v.logprob for v in pos.values() if v.rank is not None} for _, pos in pairs],
        "text_offset": [],
    }


def _pairs(deltas: list[Delta]) -> list[tuple[int, dict]]:
    return [(t, pos) for d in deltas if d.logprobs for t, pos in zip(d.token_ids, d.logprobs)]


async def _next(gen) -> Delta:
    try:
        ref = await gen.__anext__()
        return await ref
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), RequestError):
            raise e.cause from None  # the router's refusal itself: its field, and its status if not 400
        raise


async def _first_deltas(gens) -> list[Delta]:
    return await asyncio.gather(*(_next(g) for g in gens))


async def _merge(streams) -> AsyncIterator[tuple[int, Delta]]:
    """All of a request's prompts' deltas as they arrive, as (prompt index, delta), each stream after its first
    delta; a stream's exception is raised here. Closing this generator stops reading the streams."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, gen, first: Delta) -> None:
        try:
            queue.put_nowait((p, first))
            async for ref in gen:
                queue.put_nowait((p, await ref))
            queue.put_nowait((p, None))
        except Exception as e:
            queue.put_nowait((p, e))

    tasks = [asyncio.create_task(pump(p, gen, first)) for p, (gen, first) in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            p, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                live -= 1
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()


# ---- the app in the router actor's own process ------------------------------------------------------------
class LocalRouter:
    """A Router object of this process behind the calls create_app makes of its Ray actor handle: `method.remote()`
    is awaitable, `generate.options(num_returns="streaming").remote()` an async iterator of awaitables. With it the
    app runs in the router actor's process and a token reaches its client with no Ray hop: a streamed Ray item
    per token per request cost ~1.7 ms of CPU in the router and as much again in an ingress process (2 cores,
    batch 1), taken from the workers' compute threads on a small host."""

    def __init__(self, router):
        self._router = router

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._router, name))


class _LocalMethod:
    def __init__(self, fn):
        self.fn = fn

    def options(self, **_) -> _LocalMethod:  # num_returns="streaming": an async generator streams anyway
        return self

    def remote(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)  # a plain method runs now (abort: fire and forget, as over Ray)
        return _LocalStream(out) if hasattr(out, "__anext__") else _Ready(out)


class _Ready:
    """An awaitable of a value or of a coroutine's result (what awaiting an ObjectRef gives)."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        value = self.value
        if hasattr(value, "__await__"):
            value = yield from value.__await__()
        return value


class _LocalStream:
    """An async generator's items as an ObjectRefGenerator yields them: each an awaitable of the item."""

    def __init__(self, gen):
        self.gen = gen

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> _Ready:
        return _Ready(await self.gen.__anext__())


class InProcessServer:
    """uvicorn serving create_app over a router object of this process, on the running event loop (the router
    actor's: its step loops share it). The socket is bound here, so that a taken port fails with an OSError
    naming it (uvicorn's own bind would exit the process)."""

    def __init__(self, router, o: HttpOptions):
        import uvicorn

        family = socket.AF_INET6 if ":" in o.host else socket.AF_INET
        try:
            self.sock = socket.create_server((o.host, o.port), family=family, backlog=2048)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {o.host}:{o.port}: {e.strerror}") from None
        app = create_app(LocalRouter(router), o.model_name, o.api_key, max_body_bytes=o.max_body_bytes,
                         metrics_auth=o.metrics_auth)
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=o.shutdown_grace_s)
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 60.0) -> None:
        """Serve; return once it accepts connections."""
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.server.started:
            if self.task.done():
                self.task.result()  # its exception, if it raised
                raise RuntimeError("the HTTP server stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the HTTP server did not start within {timeout_s:g}s")
            await asyncio.sleep(0.01)

    async def wait(self) -> None:
        """Until the server has stopped."""
        await asyncio.shield(self.task)

    async def stop(self) -> None:
        """Stop accepting, let the requests in flight finish (within the grace period), close."""
        self.server.should_exit = True
        await asyncio.shield(self.task)
