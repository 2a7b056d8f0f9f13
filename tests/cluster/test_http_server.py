"""The real `shardserve serve` process on the SmolLM2 Q4_1 GGUF, driven by the `openai` client and raw httpx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from shardserve.cluster.config import DEFAULT_MODEL_FILE
from shardserve.cluster.launch import RAY_NAMESPACE
from shardserve.cluster.protocol import MAX_PROMPTS
from shardserve.router.sampling_params import MAX_N

API_KEY = "sk-test"
MODEL = DEFAULT_MODEL_FILE.removesuffix(".gguf")
CONTEXT = 256  # small, so a ~300-token prompt overflows it
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STARTUP_S, SHUTDOWN_S = 180.0, 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"server exited with {proc.returncode} before /health answered:\n{_log_tail(log_path)}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy within {STARTUP_S:.0f}s:\n{_log_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # uvicorn shuts down gracefully on SIGTERM; the driver's atexit stops its Ray
    try:
        proc.wait(timeout=SHUTDOWN_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this fixture started
        proc.wait(timeout=SHUTDOWN_S)


@contextlib.contextmanager
def serve_process(ray_session, tmp_path_factory, flags: str) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """A `shardserve serve` subprocess on 127.0.0.1 with `flags` added, healthy; yields (process, url, log path)
    and stops it after (unless a test already did).

    It joins the session's own Ray explicitly: left to `address="auto"`, the server would join whichever local
    cluster started last, possibly another run's with no CPU left for its worker."""
    gcs_address = ray_session.get_runtime_context().gcs_address
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path_factory.mktemp("server") / "serve.log")
    args = f"serve --host 127.0.0.1 --port {port} --kv-cache-memory-gb 0.25 --ray-address {gcs_address} {flags}"
    cmd = [os.path.join(os.path.dirname(sys.executable), "shardserve"), *args.split()]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, url, log_path)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            _stop(proc)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory) -> Iterator[str]:
    with serve_process(ray_session, tmp_path_factory, f"--api-key {API_KEY} --context-length {CONTEXT}") as (_, url, _):
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as c:
        yield c


def _metrics(http: httpx.Client) -> dict[str, float]:
    """Unlabelled samples of /metrics, by name."""
    text = http.get("/metrics").text
    return {
        k: float(v)
        for k, v in (
            line.split()
            for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line
        )
    }


def _wait_idle(http: httpx.Client, timeout_s: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until nothing runs or waits; returns the last sample and the seconds it took."""
    start = time.monotonic()
    while True:
        m = _metrics(http)
        elapsed = time.monotonic() - start
        if (m["shardserve_running"] == 0 and m["shardserve_waiting"] == 0) or elapsed > timeout_s:
            return m, elapsed
        time.sleep(0.2)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- happy paths through the openai client -----------------------------------------------------


def test_the_server_listens_in_the_router_actors_process(server):
    """`shardserve serve` serves HTTP from the router actor's own process (cluster/server.py's InProcessServer over
    LocalRouter): a token reaches its client with no Ray call between them. The listening socket is that
    process's (Ray titles it ray::Router), not the `shardserve serve` driver's."""
    import psutil

    port = int(server.rsplit(":", 1)[1])
    owners = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert len(owners) == 1, owners
    cmdline = psutil.Process(owners.pop()).cmdline()
    assert cmdline and cmdline[0].startswith("ray::Router"), cmdline


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 1


def test_streamed_chat_concatenates_to_the_non_streamed_text(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_sse_ends_with_done(http):
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_completions_stream_include_usage(client):
    kw = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "temperature": 0,
        "max_tokens": 6,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n2_with_seed_is_reproducible(client):
    kw = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "n": 2,
        "seed": 1234,
        "temperature": 1.0,
        "max_tokens": 8,
        "extra_body": {"ignore_eos": True},
    }
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # each choice draws from its own seed
    assert first.usage.completion_tokens == 16


def test_chat_logprobs_greedy(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for pos in content:
        assert len(pos.top_logprobs) == 3
        assert pos.logprob <= 0
        ranked = [alt.logprob for alt in pos.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # greedy: the sampled token is the most likely one
        assert pos.token == pos.top_logprobs[0].token
        assert pos.logprob == pytest.approx(pos.top_logprobs[0].logprob, abs=1e-6)
    # the positions cover every generated token, the end-of-turn token included (which the text skips)
    assert "".join(pos.token for pos in content).startswith(r.choices[0].message.content)


def test_stop_string_cuts_the_text(client):
    kw = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "temperature": 0,
        "max_tokens": 12,
        "extra_body": {"ignore_eos": True},
    }
    free = client.completions.create(**kw).choices[0].text
    assert "." in free, free  # greedy SmolLM2 says " Paris." here; the stop string below needs it
    stopped = client.completions.create(**kw, stop=["."]).choices[0]
    assert stopped.text == free[: free.index(".")]
    assert stopped.finish_reason == "stop"


def test_models_lists_the_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_metrics_counts_requests(http):
    r = http.get("/metrics")
    assert r.status_code == 200
    assert "shardserve_requests_total" in r.text
    m = _metrics(http)
    assert m["shardserve_total_blocks"] > 0


def _vllm_metrics(http: httpx.Client) -> dict[str, float]:
    """The `vllm:*` samples of /metrics (labelled with model_name), by name."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("vllm:") and f'model_name="{MODEL}"' in line and "_bucket" not in line:
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            out[name] = float(value)
    return out


def test_metrics_carry_vllm_names(client, http):
    """The latency histograms and token counters vLLM users graph count each answered request, streamed or not."""
    before = _vllm_metrics(http)
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    streamed = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    after = _vllm_metrics(http)
    for name in ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:time_per_output_token_seconds_count"):
        assert after[name] - before.get(name, 0) == 2, name
    usage = [plain.usage, streamed[-1].usage]
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 9
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == sum(u.prompt_tokens for u in usage)
    assert after["vllm:e2e_request_latency_seconds_sum"] > before.get("vllm:e2e_request_latency_seconds_sum", 0)
    assert 0 <= after["vllm:kv_cache_usage_perc"] <= 1 and after["vllm:num_requests_running"] == 0
    assert {"vllm:num_requests_waiting", "vllm:gpu_prefix_cache_hit_rate", "vllm:num_preemptions_total"} <= set(after)


# ---- errors, then the server still serves ----------------------------------------------------------


def test_missing_api_key_is_401(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION}, timeout=30)
    assert _assert_error(r, 401)["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/v1/models", "/openapi.json", "/docs", "/no-such-route"])
def test_api_key_guards_every_route_but_health_and_metrics(server, path):
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    assert httpx.get(f"{server}/metrics", timeout=30).status_code == 200  # Prometheus scrapes without the key
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{server}{path}", headers=headers, timeout=30)
        assert _assert_error(r, 401)["type"] == "authentication_error"  # an unknown route too: no 404 without the key
    assert httpx.get(f"{server}{path}", headers=AUTH, timeout=30).status_code == (404 if path == "/no-such-route" else 200)


class _Awaitable:
    """`handle.method.remote()` of a Ray actor, answering `value`."""

    def __init__(self, value):
        self.value = value

    async def _ready(self):
        return self.value

    def remote(self):
        return self._ready()


class _IdleRouter:
    """The router surface /health and /metrics use, idle."""

    health = _Awaitable({"ok": True, "replicas": ["serving"]})
    stats = _Awaitable({"running": 0, "waiting": 0, "free_blocks": 8, "total_blocks": 8})


@pytest.mark.parametrize("metrics_auth", [False, True])
def test_enable_metrics_auth_puts_metrics_behind_the_key(metrics_auth):
    """`--enable-metrics-auth` (create_app's metrics_auth): /metrics needs the key too; /health never does."""
    from shardserve.cluster.server import create_app

    async def get(path: str, headers: dict) -> httpx.Response:
        app = create_app(_IdleRouter(), MODEL, api_key=API_KEY, metrics_auth=metrics_auth)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.get(path, headers=headers)

    assert asyncio.run(get("/health", {})).status_code == 200
    assert asyncio.run(get("/metrics", AUTH)).text.count("shardserve_free_blocks 8.0") == 1
    unauthenticated = asyncio.run(get("/metrics", {}))
    if metrics_auth:
        assert _assert_error(unauthenticated, 401)["type"] == "authentication_error"
    else:
        assert unauthenticated.status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", -1), ("temperature", -1)],
)
def test_bad_sampling_field_is_400_naming_it(http, field, value):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, field: value})
    _assert_error(r, 400, field)


def test_empty_messages_is_400(http):
    _assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")


def test_malformed_json_is_400(http):
    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    _assert_error(r, 400)


def test_unknown_model_is_404(http):
    r = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": QUESTION})
    _assert_error(r, 404, "model")


def test_prompt_longer_than_context_is_400(http):
    prompt = "hello " * 300  # about 300 tokens against a 256-token context
    err = _assert_error(
        http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4}), 400, "prompt"
    )
    assert "prompt" in err["message"] and str(CONTEXT) in err["message"], err
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
    assert "prompt" in _assert_error(http.post("/v1/chat/completions", json=chat), 400)["message"]


def test_still_serves_after_errors_and_nothing_is_lost(client, http):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content
    m, _ = _wait_idle(http, timeout_s=30)
    assert m["shardserve_running"] == 0 and m["shardserve_waiting"] == 0
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"]


# ---- a client that goes away mid-stream ------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_blocks(http):
    max_tokens, seen = 100, 6
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    stamps = []
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.monotonic())
                if len(stamps) == seen:
                    break  # leaving the block closes the connection with the request half done
    # idle well before the rest of the generation could have run to its end: it was aborted, not finished
    bound = min(60.0, 0.5 * (max_tokens - seen) * (stamps[-1] - stamps[0]) / (seen - 1))
    m, elapsed = _wait_idle(http, timeout_s=bound)
    assert m["shardserve_running"] == 0 and m["shardserve_waiting"] == 0, (m, elapsed, bound)
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"], m
    r = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0},
    )
    assert "Paris" in r.json()["choices"][0]["text"]


# ---- request lifecycle: limits at the door, batching, a client that does not wait -------------------------


def _prompt_tokens(http: httpx.Client, prompt: str) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    return http.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]


def _first_event(http: httpx.Client, path: str, body: dict) -> dict:
    """The first SSE chunk of a streamed request; leaving early aborts the rest (a cheap way to see it admitted)."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return json.loads(next(line for line in r.iter_lines() if line.startswith("data: ")).removeprefix("data: "))


def test_max_tokens_beyond_the_context_is_400_with_the_numbers(http):
    prompt = "Once upon a time"
    p = _prompt_tokens(http, prompt)
    over = CONTEXT - p + 1
    err = _assert_error(
        http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": over}), 400, "max_tokens"
    )
    assert f"maximum context length is {CONTEXT} tokens" in err["message"], err
    assert f"{p + over} tokens ({p} in the prompt, {over} in the completion)" in err["message"], err
    chat = {"model": MODEL, "messages": QUESTION, "max_completion_tokens": CONTEXT}
    _assert_error(http.post("/v1/chat/completions", json=chat), 400, "max_tokens")
    # exactly the context is served, and no max_tokens means "up to the context"
    assert _first_event(http, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": over - 1})["choices"]
    assert _first_event(http, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION})["choices"]


def test_n_and_the_number_of_prompts_are_bounded(http):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "n": MAX_N + 1}
    assert str(MAX_N) in _assert_error(http.post("/v1/completions", json=body), 400, "n")["message"]
    body = {"model": MODEL, "prompt": ["Hi"] * (MAX_PROMPTS + 1), "max_tokens": 1}
    assert str(MAX_PROMPTS) in _assert_error(http.post("/v1/completions", json=body), 400, "prompt")["message"]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "system", "content": None}, {"role": "user", "content": "Hi"}], "messages[0].content"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "messages[1].content"),
    ],
)
def test_chat_message_without_content_is_400_naming_it(http, messages, param):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1})
    assert param in _assert_error(r, 400, param)["message"]


def test_multi_prompt_completion_batches_its_prompts(http):
    prompts, max_tokens = [f"Story number {i}:" for i in range(8)], 4
    _wait_idle(http, timeout_s=30)
    before = _metrics(http)
    body = {"model": MODEL, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    after = _metrics(http)
    steps = after["shardserve_steps"] - before["shardserve_steps"]
    # the steps' time as the workers delivered them, and rank 0's forward within it
    waited, forward = (after[k] - before[k] for k in ("shardserve_step_seconds", "shardserve_forward_seconds"))
    assert 0 < forward <= waited, (forward, waited)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == list(range(len(prompts)))
    assert r.json()["usage"]["completion_tokens"] == len(prompts) * max_tokens
    # each prompt submitted only after the previous one's first token: a prefill step each, then the last
    # one's remaining decodes, at least 8 + 3 steps; submitted together they prefill in one or two
    assert steps < len(prompts) + max_tokens - 1, steps


def test_usage_counts_each_prompt_once_and_every_choice(http):
    prompt = "Once upon a time"
    kw = {"model": MODEL, "max_tokens": 2, "ignore_eos": True}
    one = http.post("/v1/completions", json={**kw, "prompt": prompt}).json()["usage"]
    three = http.post("/v1/completions", json={**kw, "prompt": prompt, "n": 3}).json()["usage"]
    assert three["prompt_tokens"] == one["prompt_tokens"] and three["completion_tokens"] == 6
    both = http.post("/v1/completions", json={**kw, "prompt": [prompt, prompt], "n": 2}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert both["usage"]["prompt_tokens"] == 2 * one["prompt_tokens"] and both["usage"]["completion_tokens"] == 8


def test_echo_prepends_the_prompt_streamed_or_not(http):
    prompt = "The capital of France is"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert whole.startswith(prompt) and len(whole) > len(prompt), whole
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == whole


def test_echo_of_a_token_id_prompt_is_400(http):
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1, "echo": True}
    _assert_error(http.post("/v1/completions", json=body), 400, "echo")


def test_non_streaming_client_that_leaves_is_aborted_and_frees_blocks(server, http):
    prompt, max_tokens = "Once upon a time", 240
    took = []
    for n in (8, 24):  # the decode pace, without the request's fixed costs
        t0 = time.monotonic()
        http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": n, "ignore_eos": True})
        took.append(time.monotonic() - t0)
    per_token = (took[1] - took[0]) / 16
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=1.0)
    # idle well before the generation could have run to its end: it was aborted, not finished
    bound = min(60.0, 0.5 * max_tokens * per_token)
    m, elapsed = _wait_idle(http, timeout_s=bound)
    assert m["shardserve_running"] == 0 and m["shardserve_waiting"] == 0, (m, elapsed, bound)
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"], m


def test_health_is_503_while_the_only_replica_is_rebuilt(ray_session, http):
    """Kill the server's worker while it idles: the health check finds it, /health and new requests answer 503
    (OpenAI-shaped) while the replica is rebuilt, then it serves again. Last in this module: it kills a worker."""
    router = ray_session.get_actor("shardserve-router", namespace=RAY_NAMESPACE)
    pid = ray_session.get(router.get_info.remote())["workers"][0][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    deadline = time.monotonic() + 60
    while http.get("/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = http.get("/health")
    assert r.status_code == 503 and r.json()["replicas"] == ["rebuilding"], r.text
    refused = http.post("/v1/completions", json=body)
    if refused.status_code != 200:  # the rebuild of a 135M model may win the race against this request
        _assert_error(refused, 503)
    deadline = time.monotonic() + 180
    while http.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert http.get("/health").json() == {"status": "ok", "replicas": ["serving"]}
    assert http.post("/v1/completions", json=body).status_code == 200
