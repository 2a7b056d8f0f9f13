"""`shardserve batch` as a user runs it: an OpenAI batch file with good and bad lines, a kill-interrupted output
resumed, and the same command under `ray job submit` against a `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from tests.fixtures.tiny_models import make_tiny

EXE = os.path.join(os.path.dirname(sys.executable), "shardserve")
ENGINE = ["--device", "cpu", "--kv-cache-memory-gb", "0.05", "--cpu-threads-per-worker", "1", "--served-model-name", "tiny"]


def _request(cid: str, url: str = "/v1/completions", **body) -> str:
    if url == "/v1/completions":
        body = {"model": "tiny", "prompt": f"Count {cid}:", "max_tokens": 4, "temperature": 0, "ignore_eos": True, **body}
    else:
        body = {"model": "tiny", "messages": [{"role": "user", "content": cid}], "max_tokens": 3, "temperature": 0,
                "ignore_eos": True, **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


FIRST = [
    _request("c1"),
    _request("c2", "/v1/chat/completions"),
    '{"custom_id": "broken", ',  # invalid JSON
    json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),  # no custom_id
    json.dumps({"custom_id": "c5", "method": "POST", "url": "/v1/embeddings", "body": {}}),
    _request("c1"),  # a repeated custom_id
    _request("c7", stream=True),
    _request("c8", max_tokens=-1),  # the server's own 400
    _request("c9", model="other"),  # the server's own 404
    _request("c10"), _request("c11"), _request("c12", "/v1/chat/completions"),
]


def _run(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _results(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tiny(cache_dir) -> str:
    return make_tiny("llama", cache_dir)


def test_batch_writes_a_result_per_line_and_resumes(tiny, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(FIRST) + "\n")
    out = _run([EXE, "batch", "--model-path", tiny, *ENGINE, "--input", str(src), "--output", str(dst), "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12 results written (7 errors), 0 already done" in out.stdout
    results = _results(dst)
    by_id = {r["custom_id"]: r for r in results if r["custom_id"]}
    for cid in ("c1", "c2", "c10", "c11", "c12"):
        answer = by_id[cid]["response"]
        assert answer["status_code"] == 200 and by_id[cid]["error"] is None
        assert answer["body"]["choices"][0]["finish_reason"] == "length"
    assert by_id["c2"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["c8"]["response"]["status_code"] == 400 and "max_tokens" in json.dumps(by_id["c8"]["response"]["body"])
    assert by_id["c9"]["response"]["status_code"] == 404
    assert "'url' must be one of" in by_id["c5"]["error"]["message"] and by_id["c5"]["response"] is None
    assert "'stream' is not supported" in by_id["c7"]["error"]["message"]
    anonymous = sorted(r["error"]["message"] for r in results if r["custom_id"] is None)
    assert len(anonymous) == 3
    assert "line 3: invalid JSON" in anonymous[0] and "line 4: 'custom_id'" in anonymous[1]
    assert "line 6: custom_id 'c1' repeats" in anonymous[2]

    # interrupted mid-write, then rerun on a longer input: only what is not written yet runs
    with open(dst, "a") as f:
        f.write('{"id": "batch_req_cut", "custom_id": "c1')
    src.write_text("\n".join([*FIRST, _request("c13"), _request("c14", "/v1/chat/completions")]) + "\n")
    out = _run([EXE, "batch", "--model-path", tiny, *ENGINE, "--input", str(src), "--output", str(dst), "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    # c13, c14 and the two lines without a custom_id (reported again: nothing marks them done)
    assert "4 results written (2 errors), 10 already done" in out.stdout
    results = _results(dst)  # every line whole: the cut one is gone
    ids = [r["custom_id"] for r in results if r["custom_id"]]
    assert sorted(ids) == sorted({"c1", "c2", "c5", "c7", "c8", "c9", "c10", "c11", "c12", "c13", "c14"})
    assert {r["custom_id"]: r for r in results}["c14"]["response"]["status_code"] == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 80 s: a Ray head, two job drivers, two engine loads (CI's 20-minute budget)
def test_batch_under_ray_job_submit_resumes_after_a_kill(tiny, tmp_path):
    """`ray start --head` on 127.0.0.1, then `ray job submit -- shardserve batch ...` of 50 lines: the job's driver
    joins that cluster (RAY_ADDRESS) and places the workers there. Stopped halfway (`ray job stop`) and submitted
    again, the batch ends with exactly 50 result lines, one per custom_id. The head runs with --block, so ending it
    ends its processes and no other Ray on the machine is touched; Ray's token authentication is on, with a token
    of the test's own."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dash = _free_port(), _free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "8", "--include-dashboard",
         "true", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **auth},
    )
    address = ["--address", f"http://127.0.0.1:{dash}"]
    try:
        src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("\n".join(_request(f"j{i}", max_tokens=48) for i in range(50)) + "\n")
        job = [*address, "--entrypoint-num-cpus", "1", "--", EXE, "batch", "--model-path", tiny, *ENGINE,
               "--input", str(src), "--output", str(dst), "--max-concurrency", "1", "--no-progress"]
        job_id = f"batch-{secrets.token_hex(4)}"
        _submit(ray_cli, [*job[:2], "--no-wait", "--submission-id", job_id, *job[2:]], auth)
        _wait_for(lambda: dst.exists() and len(dst.read_text().splitlines()) >= 10, "10 results", 180)
        stop = _run([ray_cli, "job", "stop", *address, job_id], timeout=120, **auth)
        assert stop.returncode == 0, (stop.stdout + stop.stderr)[-2000:]
        halfway = len(_results_whole(dst))
        assert 10 <= halfway < 50, halfway
        again = _submit(ray_cli, job, auth)
        assert f"{50 - halfway} results written (0 errors), {halfway} already done" in again.stdout, again.stdout[-2000:]
        results = _results(dst)
        assert len(results) == 50 and len({r["custom_id"] for r in results}) == 50
        assert all(r["response"]["status_code"] == 200 for r in results)
    finally:
        head.terminate()
        head.wait(timeout=60)
        _forget_head(gcs)


def _forget_head(gcs_port: int) -> None:
    """`ray start` records its cluster for later `ray.init()` calls to join; ours is gone, so is the record."""
    record = "/tmp/ray/ray_current_cluster"
    if os.path.exists(record) and open(record).read().strip().endswith(f":{gcs_port}"):
        os.remove(record)


def _submit(ray_cli: str, args: list[str], auth: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the dashboard's job API is still coming up (bounded)."""
    deadline = time.monotonic() + 120
    while True:
        out = _run([ray_cli, "job", "submit", *args], timeout=300, **auth)
        if out.returncode == 0 or time.monotonic() > deadline or "Connection" not in out.stderr + out.stdout:
            break
        time.sleep(2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def _wait_for(cond, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _results_whole(path) -> list[dict]:
    """The whole lines of an output a killed run may have cut mid-line."""
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]
