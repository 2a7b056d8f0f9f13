"""Worker memory after loading a GGUF: kept quantized (the default) against --gguf-dequantize, against the file size.

For each mode, `--tp` worker processes (gloo, 127.0.0.1) load their shard exactly as a serving worker does
(workers/worker.py Worker.init, CPU, float32 compute). Each rank reports, after its imports and before loading
(baseline) and after loading: resident memory (VmRSS), the peak (VmHWM) and the bytes of the tensors its model
holds. Summed over ranks: weights bytes (what the model holds), RSS growth after load (the bound issue 16 sets:
1.5x the file) and how much of it is anonymous memory (RssAnon: the rest is file-backed, mostly libtorch code
pages the load runs for the first time), and peak growth during load (the load's transient: blocks decoded, packed). The torch and
Python runtime each process carries before loading (~300 MB) is the baseline, not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

RANK_SCRIPT = r"""
import json, sys, time
import torch
from shardserve.workers.worker import Worker

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

path, rank, tp, port, dequantize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(1)
worker = Worker(path, "cpu", "float32", None, rank, tp, gguf_dequantize=dequantize)
base_rss, base_peak, base_anon = status("VmRSS"), status("VmHWM"), status("RssAnon")
t0 = time.perf_counter()
worker.init("127.0.0.1", port, threads=1)
load_s = time.perf_counter() - t0
seen, held = set(), 0
for t in worker.model.buffers():
    if t is not None and id(t) not in seen:
        seen.add(id(t))
        held += t.numel() * t.element_size()
print(json.dumps({"rank": rank, "weights": held, "rss_growth": status("VmRSS") - base_rss,
                  "anon_growth": status("RssAnon") - base_anon,
                  "peak_growth": status("VmHWM") - base_peak, "load_s": load_s}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(path: str, tp: int, dequantize: bool) -> dict:
    port = _port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, path, str(r), str(tp), str(port), "1" if dequantize else "0"],
            stdout=subprocess.PIPE, text=True,
        )
        for r in range(tp)
    ]
    ranks = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"a rank failed ({p.returncode})")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    total = {k: sum(r[k] for r in ranks) for k in ("weights", "rss_growth", "anon_growth", "peak_growth")}
    return {**total, "load_s": max(r["load_s"] for r in ranks), "ranks": ranks}


def main(argv: list[str] | None = None) -> None:
    from shardserve.cluster.config import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default="", help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gguf_memory.json"))
    args = p.parse_args(argv)
    path = args.model_path or default_model_path()
    size = os.path.getsize(path)
    report = {"model": path, "file_bytes": size, "tp": args.tp, "modes": {}}
    for mode, dequantize in (("kept quantized", False), ("dequantized", True)):
        t0 = time.perf_counter()
        print(f"{mode}: loading {os.path.basename(path)} on {args.tp} rank(s) ...", file=sys.stderr, flush=True)
        report["modes"][mode] = measure(path, args.tp, dequantize)
        print(f"{mode}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    mb = 2**20
    print(f"{os.path.basename(path)}: {size / mb:.1f} MiB, TP={args.tp} (sums over ranks)")
    print(f"{'mode':<16}{'weights MiB':>12}{'x file':>8}{'RSS growth':>12}{'x file':>8}{'of it anon':>12}"
          f"{'peak growth':>13}{'load s':>8}")
    for mode, r in report["modes"].items():
        print(f"{mode:<16}{r['weights'] / mb:>12.1f}{r['weights'] / size:>8.2f}{r['rss_growth'] / mb:>12.1f}"
              f"{r['rss_growth'] / size:>8.2f}{r['anon_growth'] / mb:>12.1f}{r['peak_growth'] / mb:>13.1f}{r['load_s']:>8.1f}")


if __name__ == "__main__":
    main()
