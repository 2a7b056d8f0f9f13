"""Driver processes for the multi-node test: wait for a cluster's nodes, or serve greedy prompts and report placement.

`wait`: until --nodes Ray nodes are alive (bounded), then their table as JSON. `generate`: `LLM(tp, dp)` on the
cluster at --address (or, without it, on a private single-node Ray that declares --local-npus NPU and gives its
workers the torch_npu EMULATION), greedy outputs of --prompts, and for every worker rank the node Ray placed it on
(GCS actor table) and the network namespace the kernel says its process lives in. The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import ray

EMULATION_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "npu_emulation")


def alive_nodes() -> list[dict]:
    return [
        {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
        for n in ray.nodes() if n["Alive"]
    ]


def wait(args) -> dict:
    ray.init(address=args.address, log_to_driver=False)
    end = time.monotonic() + args.timeout
    nodes = alive_nodes()
    while len(nodes) < args.nodes and time.monotonic() < end:
        time.sleep(0.5)
        nodes = alive_nodes()
    if len(nodes) < args.nodes:
        sys.exit(f"only {len(nodes)} of {args.nodes} nodes alive after {args.timeout:.0f}s: {nodes}")
    return {"nodes": nodes}


def placement(info: dict) -> list[list[dict]]:
    """Per replica, per rank: pid (the rank's own report), Ray's node for that actor, and the kernel's namespace."""
    # ray._private.state.actors is Ray's DeveloperAPI over the GCS actor table: it needs no dashboard (the
    # public ray.util.state.list_actors does)
    actors = {a["Pid"]: a for a in _alive_actors("Worker")}
    replicas = []
    for ranks in info["workers"]:
        rows = []
        for r in ranks:
            actor = actors.get(r["pid"], {}).get("Address", {})
            identify = subprocess.run(["ip", "netns", "identify", str(r["pid"])], capture_output=True, text=True,
                                      timeout=10)
            rows.append({"rank": r["rank"], "pid": r["pid"], "node_id": actor.get("NodeID"), "reported_node_id": r["node_id"],
                         "node_ip": actor.get("IPAddress"), "netns": identify.stdout.strip()})
        replicas.append(rows)
    return replicas


def _alive_actors(class_name: str) -> list[dict]:
    return [a for a in ray._private.state.actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == class_name]


def placement_groups() -> list[dict]:
    return [
        {"id": pg_id, "strategy": pg["strategy"], "bundles": pg["bundles"], "nodes": pg["bundles_to_node_id"]}
        for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] == "CREATED"
    ]


def generate(args) -> dict:
    from shardserve import LLM, SamplingParams

    t0 = time.perf_counter()
    if not args.address:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (EMULATION_DIR, os.environ.get("PYTHONPATH")) if p)}
        ray.init(address="local", num_cpus=args.tp * args.dp + 1, resources={"NPU": args.local_npus},
                 include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
                 object_store_memory=100 * 2**20)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    # KV cache: 0.2 of the emulated card's 512 MiB on each npu rank (host RAM), 0.1 GiB on cpu
    llm = LLM(args.model, tp_size=args.tp, dp_size=args.dp, device=args.device, dtype="float32",
              kv_cache_memory_gb=0.1, mem_fraction_static=0.2, cpu_threads_per_worker=1,
              placement_timeout_s=args.placement_timeout, ray_address=args.address or None)
    t_start = time.perf_counter()
    try:
        outs = llm.generate(json.loads(args.prompts), params)
        t_gen = time.perf_counter()
        result = {
            "device": llm.config.device,
            "tokens": [o.outputs[0].token_ids for o in outs],
            "texts": [o.outputs[0].text for o in outs],
            "replicas": placement(llm.info),
            "placement_groups": placement_groups(),
            "router_node_ip": [a["Address"]["IPAddress"] for a in _alive_actors("Router")],
            "nodes": alive_nodes(),
            "driver_node_ip": ray.util.get_node_ip_address(),
        }
    finally:
        llm.shutdown()
    result["timings"] = {"engine_start_s": round(t_start - t0, 2), "generate_s": round(t_gen - t_start, 2),
                         "shutdown_s": round(time.perf_counter() - t_gen, 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--address", required=True)
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=60.0)
    g = sub.add_parser("generate")
    g.add_argument("--address", default="", help="the cluster's GCS; empty: a private single-node Ray")
    g.add_argument("--model", required=True)
    g.add_argument("--prompts", required=True, help="a JSON list of prompts")
    g.add_argument("--tp", type=int, default=2)
    g.add_argument("--dp", type=int, default=2)
    g.add_argument("--device", default="auto")
    g.add_argument("--max-tokens", type=int, default=8)
    g.add_argument("--local-npus", type=int, default=4)
    g.add_argument("--placement-timeout", type=float, default=60.0)
    args = parser.parse_args()
    result = wait(args) if args.cmd == "wait" else generate(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
