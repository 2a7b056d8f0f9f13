"""A real `shardserve serve` under overload, a per-request timeout, and SIGTERM: past the queue bound requests
get a 503 with Retry-After at once, a request past --request-timeout ends with an error, and SIGTERM drains the
request in flight before the server releases its workers and exits."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.test_http_server import MODEL, _log_tail, _metrics, serve_process

TIMEOUT_S = 12  # --request-timeout: 4x the longest other request here (16 tokens behind one running: ~3 s)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    flags = (f"--max-running-requests 1 --max-queued-requests 1 --request-timeout {TIMEOUT_S} "
             "--shutdown-grace-s 60")
    with serve_process(ray_session, tmp_path_factory, flags) as served:
        yield served


def _idle(url: str) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=30) as http:
        deadline = time.monotonic() + 60
        while True:
            m = _metrics(http)
            if m["shardserve_running"] == m["shardserve_waiting"] == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.2)


def test_past_the_queue_bound_requests_get_503_with_retry_after_at_once(served):
    _, url, _ = served
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}

    def post(_):
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    ok = [r for r, _ in results if r.status_code == 200]
    busy = [(r, s) for r, s in results if r.status_code == 503]
    assert len(ok) + len(busy) == len(results), [r.text for r, _ in results if r.status_code not in (200, 503)]
    assert ok and len(busy) >= 4  # one running and one queued at a time
    for r, took in busy:
        assert r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]["message"]
        assert took < 5.0, took  # refused at once, not after waiting
    m = _idle(url)
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"], m


def test_a_request_past_the_timeout_ends_with_an_error(served):
    _, url, _ = served
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5000, "ignore_eos": True}
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 500 and f"timed out after {TIMEOUT_S}s" in r.json()["error"]["message"], r.text
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 20
    m = _idle(url)
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"], m


def test_sigterm_drains_the_request_in_flight_then_exits(served):
    """Last in this module: it stops the server."""
    proc, url, log_path = served
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True, "stream": True}
    texts, done = [], False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                texts.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
                break
        proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert "choices" in event, (event, _log_tail(log_path))
                texts.append(event["choices"][0]["text"])
    assert done and len(texts) == 16, (done, len(texts), _log_tail(log_path))
    with pytest.raises(httpx.TransportError):  # no longer admitting
        httpx.get(f"{url}/health", timeout=5)
    # uvicorn re-raises the SIGTERM it handled once it has shut down: the exit status says so
    assert proc.wait(timeout=120) in (0, -signal.SIGTERM, signal.SIGTERM), _log_tail(log_path)
    assert "drained; releasing the workers" in _log_tail(log_path, 200)
