"""Multi-node: dp=2 replicas of tp=2 on a real 3-node Ray cluster, each node in its own network namespace.

The head (no NPU) holds the driver; two worker nodes declare NPU: 4 each (and 4 CPUs: either could hold both
replicas: their spread is Ray's placement of one STRICT_PACK group per replica) and give their Ray workers the torch_npu
EMULATION (tests/npu_emulation: plain torch on CPU, gloo in place of HCCL), so device "auto" resolves to npu and
placement is by the real NPU resource. The nodes talk TCP over veths and a bridge (tests/cluster/netns_cluster.py).
Checked: each TP group on one node, the two replicas on the two worker nodes (Ray's node for each worker agrees
with the namespace the kernel puts its process in), greedy tokens as on a single-node Ray, and nothing of ours
left after teardown. Needs root; skipped where `ip netns` is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.cluster.netns_cluster import NetnsCluster, NetnsUnavailable, check_netns_usable, clean_env
from tests.fixtures.tiny_models import make_tiny

PROMPTS = ["The capital of France is", "def add(a, b):", "1 2 3 4 5", "Tensor parallel serving splits"]
MAX_TOKENS = 8
BOUND_S = 300.0  # the whole test: reference run, cluster start, multi-node run, teardown (2 shared cores)


def _driver(model: str, address: str = "") -> list[str]:
    return [sys.executable, "-m", "tests.cluster.multinode_driver", "generate", "--model", model,
            "--prompts", json.dumps(PROMPTS), "--tp", "2", "--dp", "2", "--device", "auto",
            "--max-tokens", str(MAX_TOKENS), "--address", address]


def _result(run: subprocess.CompletedProcess, what: str, logs: str = "") -> dict:
    assert run.returncode == 0 and run.stdout.strip(), f"{what} failed:\n{run.stderr[-4000:]}\n{logs}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_dp2_tp2_over_two_worker_nodes_matches_single_node(cache_dir):
    try:
        check_netns_usable()
    except NetnsUnavailable as e:
        pytest.skip(f"multi-node in network namespaces: {e}")
    model = make_tiny("llama", cache_dir)
    deadline = time.monotonic() + BOUND_S

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    t0 = time.perf_counter()
    # the reference: the same engine on one node (a private local Ray declaring NPU: 4, in the root namespace)
    ref = _result(subprocess.run(_driver(model), capture_output=True, text=True, timeout=left(), env=clean_env()),
                  "single-node reference")
    t_ref = time.perf_counter()
    cluster = NetnsCluster(workers=2, worker_npus=4, worker_cpus=4, head_cpus=1, start_timeout_s=min(120.0, left()))
    with cluster:
        t_up = time.perf_counter()
        run = cluster.run_in_head(_driver(model, cluster.address), timeout_s=left())
        got = _result(run, "multi-node driver", cluster.logs())
        nodes = {n.name: n.ip for n in cluster.nodes}
        head_ip = cluster.head.ip
        t_run = time.perf_counter()
    timings = {"reference_s": t_ref - t0, "cluster_up_s": t_up - t_ref, "multinode_run_s": t_run - t_up,
               "teardown_s": time.perf_counter() - t_run, "total_s": time.perf_counter() - t0}
    print("multi-node timings:", {k: round(v, 1) for k, v in timings.items()}, "cluster:", cluster.timings,
          "driver:", got["timings"], "reference driver:", ref["timings"])
    print("placement:", json.dumps(got["replicas"]), "router on:", got["router_node_ip"])

    assert got["device"] == ref["device"] == "npu"  # "auto" against NPU resources
    assert got["driver_node_ip"] == head_ip
    replica_nodes = []
    for ranks in got["replicas"]:
        assert sorted(r["rank"] for r in ranks) == [0, 1]
        for r in ranks:  # Ray's node for the worker actor is the namespace its process runs in
            assert r["netns"] in nodes and nodes[r["netns"]] == r["node_ip"], r
            assert r["reported_node_id"] == r["node_id"], r  # the node our replica reports is Ray's
        ips = {r["node_ip"] for r in ranks}
        assert len(ips) == 1, f"a TP group spans nodes: {ranks}"  # (a)
        replica_nodes.append(ips.pop())
    assert len(set(replica_nodes)) == 2 and head_ip not in replica_nodes, replica_nodes  # (b)
    assert got["tokens"] == ref["tokens"]  # (c)
    assert all(len(t) == MAX_TOKENS for t in got["tokens"])
    assert cluster.leftovers() == {"namespaces": [], "links": [], "processes": []}  # (d)
    assert timings["total_s"] < BOUND_S
