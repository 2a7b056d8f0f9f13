"""The OpenAI-compatible HTTP ingress (FastAPI): completions and chat completions, SSE streaming, models,
health, Prometheus metrics. Talks to the router actor; one process, or a Ray Serve deployment later."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from shardserve.cluster.protocol import ChatCompletionRequest, CompletionRequest
from shardserve.router.outputs import Delta
from shardserve.router.sampling_params import RequestError, SamplingParams

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("shardserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("shardserve_generation_tokens", "tokens generated", registry=self.registry)
        self.gauges = {
            k: Gauge(f"shardserve_{k}", f"router {k.replace('_', ' ')}", registry=self.registry)
            for k in ("running", "waiting", "free_blocks", "total_blocks", "prefix_hits", "prefix_queries", "preemptions")
        }


def create_app(router, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="shardserve", version="0.1.0")
    metrics = _Metrics()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is then a byte offset, not a field
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        loc = ".".join(str(x) for x in first.get("loc", [])[1:]) or None
        return error_response(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc)

    @app.get("/health")
    async def health():
        await router.get_info.remote()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        info = await router.get_info.remote()
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "shardserve", "max_model_len": info["max_model_len"]}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        stats = await router.stats.remote()
        for k, g in metrics.gauges.items():
            g.set(stats.get(k, 0))
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
    """One HTTP request: fans its prompts out to the router, then answers in one body or as SSE."""

    def __init__(self, router, model: str, kind: str, metrics: _Metrics):
        self.router, self.model, self.kind, self.metrics = router, model, kind, metrics
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def run(self, request, params: SamplingParams, inputs: list[dict], stream: bool, stream_options, echo=False):
        endpoint = "chat" if self.kind == "chat.completion" else "completions"
        streams = []
        try:
            for i, kw in enumerate(inputs):
                gen = self.router.generate.options(num_returns="streaming").remote(f"{self.id}-{i}", params, **kw)
                first = await _next(gen)  # raises the request's error before any byte is sent
                streams.append((gen, first))
        except RequestError as e:
            self._abort(streams)
            self.metrics.requests.labels(endpoint, "400").inc()
            return error_response(400, str(e), e.param)
        self.metrics.requests.labels(endpoint, "200").inc()
        if stream:
            include_usage = bool(stream_options and stream_options.include_usage)
            return StreamingResponse(self._sse(request, streams, params.n, include_usage), media_type="text/event-stream")
        return JSONResponse(await self._collect(streams, params.n, inputs, echo))

    def _abort(self, streams) -> None:
        for i in range(len(streams)):
            self.router.abort.remote(f"{self.id}-{i}")

    async def _collect(self, streams, n: int, inputs: list[dict], echo: bool) -> dict[str, Any]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, (gen, first) in enumerate(streams):
            deltas = [first] + [d async for d in _iterate(gen)]
            prompt_tokens += len(first.prompt_token_ids or [])
            by_index: dict[int, list[Delta]] = {}
            for d in deltas:
                if d.error:
                    raise RuntimeError(d.error)
                by_index.setdefault(d.index, []).append(d)
            for idx in sorted(by_index):
                ds = by_index[idx]
                completion_tokens += sum(len(d.token_ids) for d in ds)
                text = "".join(d.text for d in ds)
                if echo and isinstance(inputs[p].get("prompt"), str):
                    text = inputs[p]["prompt"] + text
                choices.append(self._choice(p * n + idx, text, ds[-1], _pairs(ds)))
        self.metrics.tokens.inc(completion_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
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

    async def _sse(self, request, streams, n: int, include_usage: bool) -> AsyncIterator[str]:
        prompt_tokens = completion_tokens = 0
        done = False
        try:
            for p, (gen, first) in enumerate(streams):
                prompt_tokens += len(first.prompt_token_ids or [])
                if self.kind == "chat.completion":
                    for i in range(n):
                        yield self._event({"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                async for d in _chain(first, gen):
                    if await request.is_disconnected():
                        self._abort(streams)
                        return
                    completion_tokens += len(d.token_ids)
                    if d.error:
                        yield f"data: {json.dumps({'error': {'message': d.error, 'type': 'server_error', 'code': 500}})}\n\n"
                        return
                    yield self._event(self._stream_choice(p * n + d.index, d))
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
                yield f"data: {json.dumps(self._chunk([], usage))}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:
            # a client gone mid-stream: the server stops iterating us, so free its sequences here
            if not done:
                self._abort(streams)
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
        cause = e.as_instanceof_cause()
        if isinstance(cause, RequestError) or isinstance(getattr(e, "cause", None), RequestError):
            err = getattr(e, "cause", cause)
            raise RequestError(str(err), getattr(err, "param", None)) from e
        raise


async def _iterate(gen) -> AsyncIterator[Delta]:
    async for ref in gen:
        yield await ref


async def _chain(first: Delta, gen) -> AsyncIterator[Delta]:
    yield first
    async for d in _iterate(gen):
        yield d
