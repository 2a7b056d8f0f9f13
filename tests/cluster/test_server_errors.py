"""The ingress's answers to failures: a generation that fails, an unexpected exception, a chat template that refuses.

The HTTP tests drive the real FastAPI app in-process (httpx's ASGI transport) against `FailingReplicaRouter`;
the chat-template tests drive the real tokenizer and `Router.encode_prompt` on the SmolLM2 GGUF's tokenizer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from shardserve.cluster.server import create_app
from shardserve.router.outputs import Delta
from shardserve.router.router import Router
from shardserve.router.sampling_params import RequestError
from shardserve.workers.loader.tokenizer import Tokenizer

MODEL = "fake-model"
FAILURE = "RayActorError: the worker of replica 0 died"
TOKEN_S = 0.005  # the pace of the fake's healthy streams
REPLY_S = 10.0  # far longer than an answer takes; a stream left running never ends, so the reply never comes


async def _ready(value):
    return value


class _Method:
    """`handle.method.options(...).remote(...)`, as a Ray actor handle spells a call."""

    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FailingReplicaRouter:
    """Stands in for the router actor when its replica fails mid-generation, which a real server cannot be made
    to do on demand short of killing worker processes (tests/cluster/test_worker_failure.py does that, at the
    router level, slowly). It implements only the actor-handle surface the ingress uses: `generate` as a
    streaming method (an async iterator of awaitables of Delta), `abort`, `get_info`, `stats`.

    As with a Ray actor, a generation runs from its submission until it ends or is aborted, whatever its
    consumer does: `live` holds those still running. Prompt `i` of a request fails after one token when `i` is
    in `failing`; the others stream a token every TOKEN_S until aborted (a long max_tokens), the first after
    `first_token_s` (a prefill behind a queue). `raising` makes `generate` raise it, as a dead router would."""

    def __init__(self, failing: set[int] = frozenset(), raising: Exception | None = None, first_token_s: float = 0):
        self.failing, self.raising, self.first_token_s = failing, raising, first_token_s
        self.live: set[str] = set()
        self.aborted: dict[str, asyncio.Event] = {}
        self.generate = _Method(self._submit)
        self.abort = _Method(self._abort)
        self.get_info = _Method(lambda: _ready({"max_model_len": 256}))
        self.stats = _Method(lambda: _ready({"running": len(self.live)}))

    def _submit(self, request_id: str, params, prompt=None, messages=None) -> AsyncIterator:
        self.live.add(request_id)
        self.aborted[request_id] = asyncio.Event()
        return self._stream(request_id)

    async def _stream(self, request_id: str) -> AsyncIterator:
        if self.raising is not None:
            raise self.raising
        aborted = self.aborted[request_id]
        await asyncio.sleep(self.first_token_s)
        yield _ready(Delta(request_id, 0, "a", [1], prompt_token_ids=[1, 2, 3]))
        if int(request_id.rsplit("-", 1)[1]) in self.failing:
            await asyncio.sleep(10 * TOKEN_S)
            self.live.discard(request_id)
            yield _ready(Delta(request_id, 0, "", [], finish_reason="error", error=FAILURE))
            return
        while not aborted.is_set():
            await asyncio.sleep(TOKEN_S)
            yield _ready(Delta(request_id, 0, "b", [2]))
        yield _ready(Delta(request_id, 0, "", [], finish_reason="abort"))

    def _abort(self, request_id: str) -> None:
        self.live.discard(request_id)
        self.aborted[request_id].set()


async def _post(router, path: str, body: dict) -> tuple[httpx.Response, FailingReplicaRouter]:
    transport = httpx.ASGITransport(app=create_app(router, MODEL), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
        return await asyncio.wait_for(client.post(path, json=body), REPLY_S), router


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == status, err
    return err


COMPLETION = {"model": MODEL, "prompt": ["one", "two", "three"], "max_tokens": 100}


def test_failed_generation_is_an_openai_500_and_stops_its_sibling_prompts():
    r, router = asyncio.run(_post(FailingReplicaRouter(failing={1}), "/v1/completions", COMPLETION))
    err = _openai_error(r, 500)
    assert err["type"] == "server_error" and FAILURE in err["message"], err
    assert router.live == set()  # prompts 0 and 2 were aborted, not left to run to max_tokens


def test_failed_generation_streamed_ends_with_an_error_event_and_stops_its_siblings():
    body = {**COMPLETION, "stream": True}
    r, router = asyncio.run(_post(FailingReplicaRouter(failing={1}), "/v1/completions", body))
    assert r.status_code == 200
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error" and FAILURE in last["error"]["message"], last
    assert router.live == set()


def test_unexpected_exception_is_an_openai_500_not_plain_text(caplog):
    router = FailingReplicaRouter(raising=RuntimeError("the router actor is gone"))
    with caplog.at_level("ERROR", logger="shardserve.cluster.server"):
        r, _ = asyncio.run(_post(router, "/v1/completions", COMPLETION))
    err = _openai_error(r, 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"], err
    assert any(rec.exc_info and "the router actor is gone" in str(rec.exc_info[1]) for rec in caplog.records)


async def _leave_after(router, body: dict, leave_s: float) -> None:
    """POST `body` as a raw ASGI client that disconnects `leave_s` after sending it, without reading."""
    gone_at = time.monotonic() + leave_s
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        if time.monotonic() < gone_at:
            await asyncio.sleep(gone_at - time.monotonic())
        return {"type": "http.disconnect"}

    async def send(_):
        pass

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    await asyncio.wait_for(create_app(router, MODEL)(scope, receive, send), REPLY_S)


@pytest.mark.parametrize("first_token_s", [0, 5.0], ids=["while-collecting", "before-the-first-token"])
def test_non_streaming_client_that_leaves_aborts_every_prompt(first_token_s):
    router = FailingReplicaRouter(first_token_s=first_token_s)
    asyncio.run(_leave_after(router, COMPLETION, leave_s=0.2))
    assert router.live == set()


# ---- chat templates that refuse the messages, or fail on them -------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


def _router_with_template(tokenizer: Tokenizer, template: str) -> Router:
    """A router that is never started: encode_prompt needs only its tokenizer."""
    tok = dataclasses.replace(tokenizer, chat_template=template)
    return Router(type("Cfg", (), {"model_path": "unused"}), None, lambda _: tok)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # as Mistral's and Llama 2's templates refuse a conversation that does not alternate
        ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation roles must alternate "
         "user/assistant') }}{% endif %}{{ messages[0]['content'] }}", "Conversation roles must alternate"),
        ("{{ messages[0]['content'] + 1 }}", "the chat template failed"),  # the template's own bug
    ],
)
def test_chat_template_errors_are_request_errors_naming_messages(smollm2_tokenizer, template, expected):
    router = _router_with_template(smollm2_tokenizer, template)
    with pytest.raises(RequestError, match=expected) as info:
        router.encode_prompt(None, [{"role": "assistant", "content": "Hi"}])
    assert info.value.param == "messages"


def test_the_smollm2_template_still_renders(smollm2_tokenizer):
    router = _router_with_template(smollm2_tokenizer, smollm2_tokenizer.chat_template)
    ids, text = router.encode_prompt(None, [{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") and ids
