"""Serving over HTTP on CPU: `shardserve serve` against llama.cpp's llama-server, same GGUF, same thread count.

Each server is started in turn on 127.0.0.1 (never side by side), timed from launch to its first answer, then
sent, through its OpenAI-compatible /v1/completions with streaming, greedy, EOS ignored:
  - batch 1: one request at a time (TTFT: first streamed token; TPOT: the rest over their count);
  - C concurrent: C requests at once, each `--max-tokens`; aggregate tok/s = completion tokens / wall time.
Every round uses prompts no earlier round sent (no prefix cache hits). Peak RSS: the server's process tree (Ray's
processes included for shardserve), summed per process, sampled every 0.2 s. See benchmarks/README.md.

llama-server is not on PyPI: pass a binary built from llama.cpp (--llama-server, or $LLAMA_SERVER); without one
only shardserve is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx
from bench_decode import step_split  # this directory: run as a script

logger = logging.getLogger("bench_http")

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "http.json")
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0


@dataclass
class Sample:
    """One streamed completion: when it was sent, its first token and its end arrived, and its token count."""

    sent: float
    first: float
    done: float
    tokens: int

    @property
    def tpot_ms(self) -> float:
        return (self.done - self.first) / max(self.tokens - 1, 1) * 1e3


@dataclass
class Workload:
    requests: int
    concurrency: int
    max_tokens: int
    wall_s: float
    tokens: int
    ttft_ms_median: float
    tpot_ms_median: float

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class ServerResult:
    engine: str
    command: list[str]
    ready_s: float = float("nan")
    batch1: Workload | None = None
    concurrent: Workload | None = None
    peak_rss_mb: float = float("nan")
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"engine": self.engine, "command": self.command, "ready_s": self.ready_s,
               "peak_rss_mb": self.peak_rss_mb, "notes": self.notes}
        for name in ("batch1", "concurrent"):
            w = getattr(self, name)
            if w is not None:
                out[name] = {**asdict(w), "tps": w.tps}
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler:
    """Peak summed RSS of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def wait_ready(base: str, proc: subprocess.Popen, start: float) -> float:
    """Seconds from `start` to the first 200 on /v1/models (bounded); raises if the server exits first."""
    deadline = start + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            try:
                if client.get(f"{base}/v1/models").status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"not ready within {READY_TIMEOUT_S:.0f}s")


async def complete(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices") or ()):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    if tokens != max_tokens:
        raise RuntimeError(f"generated {tokens} tokens, expected {max_tokens} (EOS must be ignored)")
    return Sample(sent, first or done, done, tokens)


async def run_round(base: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> Workload:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(p: str) -> Sample:
            async with gate:
                return await complete(client, base, model, p, max_tokens)

        t0 = time.perf_counter()
        samples = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return Workload(len(prompts), concurrency, max_tokens, wall, sum(s.tokens for s in samples),
                    statistics.median((s.first - s.sent) * 1e3 for s in samples),
                    statistics.median(s.tpot_ms for s in samples))


def step_counters(base: str) -> dict[str, float]:
    """shardserve's /metrics step counters, by the router stats' names bench_decode.step_split reads (steps, the
    router's wait for them, rank 0's forward); {} elsewhere."""
    r = httpx.get(f"{base}/metrics")
    names = {"shardserve_steps": "steps", "shardserve_step_seconds": "step_seconds",
             "shardserve_forward_seconds": "forward_seconds"}
    out = {}
    for line in r.text.splitlines() if r.status_code == 200 else ():
        name, _, value = line.partition(" ")
        if name in names:
            out[names[name]] = float(value)
    return out if len(out) == len(names) else {}


class Prompts:
    """Distinct prompts for every round: no server answers one from a prefix it cached for an earlier round."""

    def __init__(self):
        self.n = 0

    def take(self, k: int) -> list[str]:
        out = [f"Story {self.n + i}: once upon a time, in a small village by the sea," for i in range(k)]
        self.n += k
        return out


def bench_server(engine: str, command: list[str], base: str, args: argparse.Namespace,
                 env: dict | None = None) -> ServerResult:
    result = ServerResult(engine, command)
    logger.info("== %s: %s", engine, " ".join(command))
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    rss = RssSampler(proc.pid)
    err_tail: collections.deque[str] = collections.deque(maxlen=40)  # the server's last lines, for a failure
    threading.Thread(target=lambda: err_tail.extend(proc.stderr), daemon=True).start()
    try:
        result.ready_s = wait_ready(base, proc, start)
        logger.info("%s: ready in %.1fs", engine, result.ready_s)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        prompts = Prompts()
        asyncio.run(run_round(base, model, prompts.take(2), 8, 2))  # warm-up: first-call allocations, pools
        before = step_counters(base)
        b1 = [asyncio.run(run_round(base, model, prompts.take(1), args.max_tokens, 1)) for _ in range(args.b1_requests)]
        after = step_counters(base)
        if before and after:
            split = step_split(before, after)
            result.notes.append("b1: step {step_ms:.2f} ms = forward {forward_ms:.2f} + protocol {protocol_ms:.2f}"
                                .format(**split))
        result.batch1 = Workload(len(b1), 1, args.max_tokens, sum(w.wall_s for w in b1), sum(w.tokens for w in b1),
                                 statistics.median(w.ttft_ms_median for w in b1),
                                 statistics.median(w.tpot_ms_median for w in b1))
        logger.info("%s batch-1: %.1f tok/s", engine, result.batch1.tps)
        c = args.concurrency
        result.concurrent = asyncio.run(run_round(base, model, prompts.take(c), args.max_tokens, c))
        logger.info("%s %d-concurrent: %.1f tok/s", engine, c, result.concurrent.tps)
    except Exception:
        logger.error("%s failed; its stderr's tail:\n%s", engine, "".join(err_tail))
        raise
    finally:
        result.peak_rss_mb = rss.stop()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return result


def run_shardserve(args: argparse.Namespace) -> ServerResult:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "shardserve")
    cmd = [exe, "serve", "--model-path", args.model_path, "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--cpu-threads-per-worker", str(args.threads),
           "--max-running-requests", str(max(16, args.concurrency))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as `make serve` starts
    result = bench_server("shardserve", cmd, f"http://127.0.0.1:{port}", args, env)
    result.notes.append("local Ray started by the server (ready time includes it)")
    return result


def run_llama_server(args: argparse.Namespace) -> ServerResult:
    port = free_port()
    slots = args.concurrency
    ctx_per_slot = 512
    cmd = [args.llama_server, "-m", args.model_path, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(ctx_per_slot * slots),
           "--no-webui"]
    result = bench_server("llama-server", cmd, f"http://127.0.0.1:{port}", args)
    result.notes.append(f"{slots} parallel slots, continuous batching, {ctx_per_slot} context tokens a slot")
    return result


ENGINES = {"shardserve": run_shardserve, "llama-server": run_llama_server}


def table(results: dict[str, ServerResult], args: argparse.Namespace) -> str:
    c = args.concurrency
    head = (f"{'engine':<16}{'ready s':>9}{'b1 tok/s':>10}{'b1 TTFT':>9}{'b1 TPOT':>9}{f'{c}x tok/s':>11}"
            f"{f'{c}x TTFT':>10}{f'{c}x TPOT':>10}{'peak RSS MB':>13}")
    lines = [f"HTTP /v1/completions, streamed, {args.threads} threads, {args.max_tokens} tokens a request, "
             f"EOS ignored (ms: medians over requests)", head, "-" * len(head)]
    for r in results.values():
        b, k = r.batch1, r.concurrent
        lines.append(f"{r.engine:<16}{r.ready_s:>9.1f}{b.tps:>10.1f}{b.ttft_ms_median:>9.1f}{b.tpot_ms_median:>9.2f}"
                     f"{k.tps:>11.1f}{k.ttft_ms_median:>10.1f}{k.tpot_ms_median:>10.2f}{r.peak_rss_mb:>13.0f}  "
                     + "; ".join(r.notes))
    ours, peer = results.get("shardserve"), results.get("llama-server")
    if ours and peer:
        lines.append(f"shardserve/llama-server: batch-1 {ours.batch1.tps / peer.batch1.tps:.2f}x, "
                     f"{c}-concurrent {ours.concurrent.tps / peer.concurrent.tps:.2f}x, "
                     f"ready {ours.ready_s / peer.ready_s:.2f}x the time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from shardserve.cluster.config import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default="", help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens a request (EOS ignored)")
    p.add_argument("--b1-requests", type=int, default=3, help="batch-1 requests, one after another")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server") or "",
                   help="llama.cpp's llama-server binary (default: $LLAMA_SERVER, else on PATH)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    args.model_path = args.model_path or default_model_path()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request
    if "llama-server" in args.engines and not args.llama_server:
        logger.warning("no llama-server binary (--llama-server or $LLAMA_SERVER): measuring shardserve only")
        args.engines = [e for e in args.engines if e != "llama-server"]

    load_start = os.getloadavg()[0]
    results = {}
    for name in args.engines:
        results[name] = ENGINES[name](args)
    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_avg_1m_start": load_start,
                    "load_avg_1m_end": os.getloadavg()[0]},
        "model": args.model_path,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "results": [r.summary() for r in results.values()],
    }
    print(table(results, args))
    print(f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
