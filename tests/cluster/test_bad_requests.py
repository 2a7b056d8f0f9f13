"""Issue 20's catalog of bad requests against the real `shardserve serve`: each answers an OpenAI-shaped 4xx
naming its field, and the server stays healthy with nothing left running and every KV block free."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from shardserve.router.sampling_params import MAX_N, MAX_STOP, MAX_STOP_CHARS
from tests.cluster.test_http_server import AUTH, CONTEXT, MODEL, _wait_idle

# the `server` fixture, module-scoped: this module starts a server of its own
from tests.cluster.test_http_server import server as _server  # noqa: F401

MAX_BODY = 8 * 2**20  # create_app's default
USER = [{"role": "user", "content": "Hi"}]
LONG = "hello " * 300  # about 300 tokens against a 256-token context
VOCAB = 49152  # SmolLM2's

C, CHAT = "/v1/completions", "/v1/chat/completions"


def _c(**kw) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **kw}


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


JSON = {"Content-Type": "application/json"}

# (id, method, path, body: dict/list (JSON) or bytes (raw), extra headers, status, error.param, message regex)
CATALOG = [
    ("malformed-json-c", "POST", C, b'{"prompt": "Hi",', JSON, 400, None, r"not valid JSON"),
    ("malformed-json-chat", "POST", CHAT, b'{"messages": [', JSON, 400, None, r"not valid JSON"),
    ("invalid-utf8-c", "POST", C, b'{"prompt": "\xff\xfe"}', JSON, 400, None, r"not valid JSON|UTF-8"),
    ("invalid-utf8-chat", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', JSON, 400, None, r"UTF-8|JSON"),
    ("non-object-body", "POST", C, b"[1, 2, 3]", JSON, 400, None, r"JSON object"),
    ("string-body", "POST", CHAT, b'"hello"', JSON, 400, None, r"JSON object"),
    ("not-json-content-type", "POST", C, b"prompt=Hi", {"Content-Type": "text/plain"}, 400, None, r"JSON object"),
    ("empty-body", "POST", CHAT, b"", JSON, 400, None, r"body|JSON"),
    ("oversized-body", "POST", C, json.dumps(_c(prompt="x" * (MAX_BODY + 1))).encode(), JSON, 413, None, r"exceeds .* limit"),
    ("unknown-route", "GET", "/v1/nothing", None, {}, 404, None, r"no route GET /v1/nothing"),
    ("wrong-method", "GET", C, None, {}, 405, None, r"GET is not allowed"),
    ("unknown-model-c", "POST", C, _c(model="gpt-9"), {}, 404, "model", r"'gpt-9' does not exist"),
    ("unknown-model-chat", "POST", CHAT, _chat(model="gpt-9"), {}, 404, "model", r"does not exist"),
    ("missing-prompt", "POST", C, {"model": MODEL}, {}, 400, "prompt", r"prompt: Field required"),
    ("missing-messages", "POST", CHAT, {"model": MODEL}, {}, 400, "messages", r"Field required"),
    ("empty-prompt", "POST", C, _c(prompt=""), {}, 400, "prompt", r"empty"),
    ("prompt-empty-list", "POST", C, _c(prompt=[]), {}, 400, "prompt", r"non-empty"),
    ("prompt-empty-ids", "POST", C, _c(prompt=[[]]), {}, 400, "prompt", r"empty"),
    ("prompt-wrong-type", "POST", C, _c(prompt=42), {}, 400, "prompt", r"must be a string"),
    ("prompt-mixed-list", "POST", C, _c(prompt=[1, "a"]), {}, 400, "prompt", r"must be a string"),
    ("prompt-beyond-context-c", "POST", C, _c(prompt=LONG), {}, 400, "prompt", rf"context is {CONTEXT}"),
    ("prompt-beyond-context-chat", "POST", CHAT, _chat(messages=[{"role": "user", "content": LONG}]), {}, 400, "prompt", r"context"),
    ("ids-outside-vocab", "POST", C, _c(prompt=[1, VOCAB + 5]), {}, 400, "prompt", r"out of the vocabulary"),
    ("ids-negative", "POST", C, _c(prompt=[[3, -1]]), {}, 400, "prompt", r"out of the vocabulary"),
    ("max-tokens-zero-c", "POST", C, _c(max_tokens=0), {}, 400, "max_tokens", r"max_tokens must be >= 1"),
    ("max-tokens-negative-chat", "POST", CHAT, _chat(max_tokens=-3), {}, 400, "max_tokens", r">= 1"),
    ("max-completion-tokens-zero", "POST", CHAT, _chat(max_completion_tokens=0), {}, 400, "max_completion_tokens", r">= 1"),
    ("max-tokens-beyond-context-c", "POST", C, _c(max_tokens=CONTEXT), {}, 400, "max_tokens", r"maximum context length"),
    ("max-tokens-beyond-context-chat", "POST", CHAT, _chat(max_tokens=10**6), {}, 400, "max_tokens", r"maximum context length"),
    ("max-tokens-string", "POST", C, _c(max_tokens="5"), {}, 400, "max_tokens", r"valid integer"),
    ("max-tokens-float", "POST", CHAT, _chat(max_tokens=2.0), {}, 400, "max_tokens", r"valid integer"),
    ("temperature-high", "POST", C, _c(temperature=3.0), {}, 400, "temperature", r"\[0, 2\]"),
    ("temperature-negative-chat", "POST", CHAT, _chat(temperature=-0.5), {}, 400, "temperature", r"\[0, 2\]"),
    ("temperature-string", "POST", CHAT, _chat(temperature="hot"), {}, 400, "temperature", r"valid number"),
    ("top-p-zero", "POST", C, _c(top_p=0), {}, 400, "top_p", r"\(0, 1\]"),
    ("top-p-high-chat", "POST", CHAT, _chat(top_p=1.5), {}, 400, "top_p", r"\(0, 1\]"),
    ("top-k-minus-two", "POST", C, _c(top_k=-2), {}, 400, "top_k", r"top_k must be"),
    ("min-p-high-chat", "POST", CHAT, _chat(min_p=1.5), {}, 400, "min_p", r"\[0, 1\]"),
    ("presence-penalty-range", "POST", C, _c(presence_penalty=3), {}, 400, "presence_penalty", r"\[-2, 2\]"),
    ("frequency-penalty-unsupported", "POST", CHAT, _chat(frequency_penalty=0.5), {}, 400, "frequency_penalty", r"not supported"),
    ("logit-bias-unsupported", "POST", C, _c(logit_bias={"5": 1.0}), {}, 400, "logit_bias", r"not supported"),
    ("logprobs-beyond-limit-c", "POST", C, _c(logprobs=21), {}, 400, "logprobs", r"\[0, 20\]"),
    ("logprobs-bool-c", "POST", C, _c(logprobs=True), {}, 400, "logprobs", r"valid integer"),
    ("top-logprobs-beyond-limit", "POST", CHAT, _chat(logprobs=True, top_logprobs=21), {}, 400, "top_logprobs", r"\[0, 20\]"),
    ("top-logprobs-without-logprobs", "POST", CHAT, _chat(top_logprobs=2), {}, 400, "top_logprobs", r"needs logprobs"),
    ("prompt-logprobs-beyond-limit", "POST", C, _c(prompt_logprobs=50), {}, 400, "prompt_logprobs", r"\[0, 20\]"),
    ("n-zero", "POST", C, _c(n=0), {}, 400, "n", rf"\[1, {MAX_N}\]"),
    ("n-beyond-limit-chat", "POST", CHAT, _chat(n=MAX_N + 1), {}, 400, "n", rf"\[1, {MAX_N}\]"),
    ("seed-beyond-int64", "POST", C, _c(seed=2**64), {}, 400, "seed", r"64-bit"),
    ("stop-wrong-type", "POST", C, _c(stop=5), {}, 400, "stop", r"valid"),
    ("stop-list-of-ints-chat", "POST", CHAT, _chat(stop=[1, 2]), {}, 400, "stop", r"valid string"),
    ("stop-too-many", "POST", C, _c(stop=[f"s{i}" for i in range(MAX_STOP + 1)]), {}, 400, "stop", rf"at most {MAX_STOP}"),
    ("stop-too-long-chat", "POST", CHAT, _chat(stop="x" * (MAX_STOP_CHARS + 1)), {}, 400, "stop", rf"{MAX_STOP_CHARS} characters"),
    ("stop-token-ids-negative", "POST", C, _c(stop_token_ids=[-1]), {}, 400, "stop_token_ids", r">= 0"),
    ("min-tokens-above-max", "POST", C, _c(min_tokens=5, max_tokens=2), {}, 400, "min_tokens", r"<= max_tokens"),
    ("stream-string", "POST", CHAT, _chat(stream="yes"), {}, 400, "stream", r"valid boolean"),
    ("messages-empty", "POST", CHAT, _chat(messages=[]), {}, 400, "messages", r"at least one"),
    ("messages-not-a-list", "POST", CHAT, _chat(messages="Hi"), {}, 400, "messages", r"valid list"),
    ("role-unknown", "POST", CHAT, _chat(messages=[{"role": "wizard", "content": "Hi"}]), {}, 400, "messages[0].role", r"'user'"),
    ("role-missing", "POST", CHAT, _chat(messages=[{"content": "Hi"}]), {}, 400, "messages[0].role", r"Field required"),
    ("content-missing", "POST", CHAT, _chat(messages=[{"role": "user"}]), {}, 400, "messages[0].content", r"missing"),
    ("content-null-second", "POST", CHAT, _chat(messages=[*USER, {"role": "assistant", "content": None}]), {}, 400, "messages[1].content", r"missing"),
    ("content-image-part", "POST", CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), {}, 400, "messages[0].content", r"'image_url'.*only 'text'"),
    ("content-part-without-text", "POST", CHAT, _chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), {}, 400, "messages[0].content", r"string 'text'"),
    ("content-number", "POST", CHAT, _chat(messages=[{"role": "user", "content": 7}]), {}, 400, "messages[0].content", r"string or a list"),
    ("name-wrong-type", "POST", CHAT, _chat(messages=[{"role": "user", "content": "Hi", "name": 5}]), {}, 400, "messages[0].name", r"valid string"),
    # a chat template that raises: SmolLM2's never does; test_server_errors.py drives one that does
]


@pytest.fixture(scope="module")
def http(_server) -> Iterator[httpx.Client]:  # noqa: F811
    with httpx.Client(base_url=_server, headers=AUTH, timeout=60) as c:
        yield c


def assert_openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and (err["param"] is None or isinstance(err["param"], str)), err
    assert err["code"] == r.status_code, err
    return err


def _send(http: httpx.Client, method: str, path: str, body, headers: dict) -> httpx.Response:
    if body is None:
        return http.request(method, path, headers=headers)
    if isinstance(body, bytes):
        return http.request(method, path, content=body, headers=headers)
    return http.request(method, path, json=body, headers=headers)


def test_catalog_is_large_enough():
    assert len(CATALOG) >= 30 and len({row[0] for row in CATALOG}) == len(CATALOG)


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "param", "message"), [r[1:] for r in CATALOG], ids=[r[0] for r in CATALOG])
def test_bad_request(http, method, path, body, headers, status, param, message):
    r = _send(http, method, path, body, headers)
    assert r.status_code == status, r.text
    err = assert_openai_error(r)
    assert err["param"] == param, err
    assert re.search(message, err["message"]), err


def test_oversized_chunked_body_is_413(http):
    # no Content-Length: the limit is counted as the chunks arrive
    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 2**20 + 1):
            yield b"x" * 2**20
        yield b'"}'

    r = http.post(C, content=chunks(), headers=JSON)
    assert r.status_code == 413, r.text
    assert "limit" in assert_openai_error(r)["message"]


def test_healthy_and_nothing_left_after_the_catalog(http):
    assert http.get("/health").status_code == 200
    r = http.post(C, json=_c(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text
    m, _ = _wait_idle(http, timeout_s=30)
    assert m["shardserve_running"] == 0 and m["shardserve_waiting"] == 0, m
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"], m
