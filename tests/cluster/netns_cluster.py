"""A real multi-node Ray cluster on one machine: one network namespace per node, joined by a Linux bridge.

Each node is a `ray start --block` inside its own namespace (`ip netns exec`), with its own IP on a private /24,
its own --temp-dir, and the custom resources it declares; nodes talk real TCP over veth pairs into a bridge in the
root namespace. The bridge holds .254 of the subnet, so the root namespace reaches the nodes too, but the drivers
run inside the head's namespace (`run_in_head`). The namespaces have no default route: nothing outside this
machine is reachable from a node.

Teardown never calls `ray stop` (PIDs are shared across network namespaces: it would kill every Ray process on
the machine). It kills the process groups it started, then whatever still runs inside its namespaces
(`ip netns pids`), then deletes the veths, the bridge and the namespaces. Names carry the creating pid, so a
later run removes what a crashed one left (`cleanup_leftovers`). Needs root.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PREFIX = "ssmn"  # namespaces ssmn<pid>-n<k>; root-namespace links ssmb<pid> (bridge) and ssmv<pid>n<k> (veth ends)
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-n\d+$")
_LINK_RE = re.compile(r"^ssm[bv](\d+)(n\d+)?$")
SUBNET_BASE = "10.213"  # 10.213.<x>.0/24, x picked unused
GCS_PORT = 6380
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NPU_EMULATION_DIR = os.path.join(REPO, "tests", "npu_emulation")
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")
OBJECT_STORE_BYTES = 100 * 2**20  # Ray's minimum is 75 MiB; the default (30% of RAM per node) is far too much here
TERM_WAIT_S = 5.0  # Ray drains for ~10 s on SIGTERM; its state dies with the namespaces anyway
KILL_WAIT_S = 5.0


class NetnsUnavailable(RuntimeError):
    """Not root, or `ip netns` / bridges / veths refused here: the caller skips."""


@dataclass
class Node:
    name: str  # the network namespace
    ip: str
    num_cpus: int
    resources: dict[str, float]
    temp_dir: str
    log: str
    proc: subprocess.Popen | None = None


@dataclass
class NetnsCluster:
    """`with NetnsCluster(...) as c:` starts a head (no NPU) and `workers` nodes of `worker_npus` NPU each."""

    workers: int = 2
    worker_npus: int = 2
    worker_cpus: int = 2
    head_cpus: int = 1
    worker_pythonpath: str = NPU_EMULATION_DIR  # worker nodes' Ray workers import the torch_npu EMULATION from here
    start_timeout_s: float = 90.0
    nodes: list[Node] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tag = f"{os.getpid()}"
        self.bridge = f"ssmb{self.tag}"
        self.tmp = ""
        self.subnet = ""
        self.seen_pids: set[int] = set()
        # token auth with a token of this cluster's own, in the environment of its nodes and drivers only: not the
        # machine's ~/.ray/auth_token, which other Ray users here share
        self.token = secrets.token_hex(32)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> NetnsCluster:
        check_netns_usable()
        cleanup_leftovers()
        t0 = time.perf_counter()
        try:
            self._make_network()
            self.timings["network_s"] = round(time.perf_counter() - t0, 2)
            self._start_ray()
            self.timings["ray_up_s"] = round(time.perf_counter() - t0 - self.timings["network_s"], 2)
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def teardown(self) -> None:
        """Bounded: SIGTERM our process groups, SIGKILL what is left, kill anything still in our namespaces,
        then delete links and namespaces. Safe to call twice, and on a half-built cluster."""
        t0 = time.perf_counter()
        for n in self.nodes:  # every process of every node (gcs, raylet, agents, workers), for leftovers()
            self.seen_pids |= set(_netns_pids(n.name))
        procs = [n.proc for n in self.nodes if n.proc is not None]
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        _wait_all(procs, TERM_WAIT_S)
        for p in procs:
            _signal_group(p, signal.SIGKILL)
        _wait_all(procs, KILL_WAIT_S)
        for n in self.nodes:
            _kill_netns_pids(n.name)
        for k in range(1, len(self.nodes) + 1):
            _run(["ip", "link", "del", f"ssmv{self.tag}n{k}"], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        for n in self.nodes:
            _run(["ip", "netns", "del", n.name], check=False)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.timings["teardown_s"] = round(time.perf_counter() - t0, 2)

    def leftovers(self) -> dict[str, list]:
        """What of ours still exists: namespaces, links, live processes once seen in our namespaces (all empty when
        clean)."""
        names = {n.name for n in self.nodes}
        links = _link_names()
        return {
            "namespaces": sorted(names & set(_netns_names())),
            "links": sorted(name for name in links if name == self.bridge or name.startswith(f"ssmv{self.tag}n")),
            "processes": sorted(pid for pid in self.seen_pids if _running(pid)),
        }

    # ---- network -----------------------------------------------------------------------------------------------
    def _make_network(self) -> None:
        x = _free_subnet_octet()
        self.subnet = f"{SUBNET_BASE}.{x}.0/24"
        self.tmp = tempfile.mkdtemp(prefix=f"{PREFIX}{self.tag}-")
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{SUBNET_BASE}.{x}.254/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for k in range(1, self.workers + 2):
            head = k == 1
            node = Node(
                name=f"{PREFIX}{self.tag}-n{k}", ip=f"{SUBNET_BASE}.{x}.{k}",
                num_cpus=self.head_cpus if head else self.worker_cpus,
                resources={"NPU": 0} if head else {"NPU": self.worker_npus},
                temp_dir=os.path.join(self.tmp, f"n{k}"), log=os.path.join(self.tmp, f"n{k}.log"),
            )
            self.nodes.append(node)
            host_end = f"ssmv{self.tag}n{k}"
            _run(["ip", "netns", "add", node.name])
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", node.name])
            _run(["ip", "link", "set", host_end, "master", self.bridge])
            _run(["ip", "link", "set", host_end, "up"])
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{node.ip}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"]):
                _run(["ip", "netns", "exec", node.name, *cmd])

    # ---- ray ---------------------------------------------------------------------------------------------------
    def _start_ray(self) -> None:
        common = ["--block", "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}"]
        head = self.head
        self._spawn(head, ["--head", f"--port={GCS_PORT}", "--include-dashboard=false", *common], pythonpath=None)
        self.wait_tcp(head.ip, GCS_PORT, self.start_timeout_s)
        for node in self.nodes[1:]:
            self._spawn(node, [f"--address={self.address}", *common], pythonpath=self.worker_pythonpath)
        self.node_table = self.wait_nodes(len(self.nodes), self.start_timeout_s)

    def _spawn(self, node: Node, args: list[str], pythonpath: str | None) -> None:
        env = self.env(pythonpath)
        cmd = ["ip", "netns", "exec", node.name, RAY_BIN, "start", f"--node-ip-address={node.ip}",
               f"--num-cpus={node.num_cpus}", f"--resources={json.dumps(node.resources)}",
               f"--temp-dir={node.temp_dir}", *args]
        with open(node.log, "wb") as log:  # the child keeps its own descriptor
            node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, cwd=self.tmp)

    def wait_tcp(self, host: str, port: int, timeout_s: float) -> None:
        """Until the head's GCS accepts a connection from inside its namespace; raises with the node logs."""
        probe = ("import socket,sys,time\nend=time.time()+float(sys.argv[3])\nwhile time.time()<end:\n"
                 " try:\n  socket.create_connection((sys.argv[1],int(sys.argv[2])),1).close();sys.exit(0)\n"
                 " except OSError:\n  time.sleep(0.3)\nsys.exit(1)")
        run = self.run_in_head([sys.executable, "-c", probe, host, str(port), str(timeout_s)], timeout_s + 10)
        if run.returncode != 0:
            raise RuntimeError(f"the head's GCS {host}:{port} did not accept within {timeout_s:.0f}s\n{self.logs()}")

    def wait_nodes(self, count: int, timeout_s: float) -> list[dict]:
        """Until `count` nodes are alive in ray.nodes(), from a driver in the head's namespace; bounded."""
        cmd = [sys.executable, "-m", "tests.cluster.multinode_driver", "wait", "--address", self.address,
               "--nodes", str(count), "--timeout", str(timeout_s)]
        run = self.run_in_head(cmd, timeout_s + 60)
        if run.returncode != 0:
            raise RuntimeError(f"{count} Ray nodes not alive within {timeout_s:.0f}s: {run.stderr[-2000:]}\n{self.logs()}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    def run_in_head(self, cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        """A driver process inside the head's namespace (the multi-node driver must not be the test's process)."""
        return subprocess.run(["ip", "netns", "exec", self.head.name, *cmd], capture_output=True, text=True,
                              timeout=timeout_s, env=self.env(None), cwd=REPO)

    def netns_of(self, pid: int) -> str:
        """The namespace a process lives in, as the kernel says (`ip netns identify`)."""
        return _run(["ip", "netns", "identify", str(pid)], check=False).stdout.strip()

    def logs(self, chars: int = 1500) -> str:
        parts = []
        for n in self.nodes:
            try:
                with open(n.log, errors="replace") as f:
                    parts.append(f"--- {n.name} ({n.ip}) ---\n{f.read()[-chars:]}")
            except OSError:
                continue
        return "\n".join(parts)


    def env(self, pythonpath: str | None) -> dict[str, str]:
        """For a node or driver of this cluster: its auth token, no Ray address to join by accident, REPO (and
        `pythonpath`) importable."""
        env = clean_env(pythonpath)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env


def clean_env(pythonpath: str | None = None) -> dict[str, str]:
    """Our environment without a Ray address or token to join by accident, with REPO (and `pythonpath`) importable."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ASCEND_RT_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, REPO, env.get("PYTHONPATH")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


# ---- host checks and cleanup -----------------------------------------------------------------------------------
def check_netns_usable() -> None:
    """Raise NetnsUnavailable unless we are root and can make (and remove) a namespace here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("needs root (ip netns add, bridges, veths)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` is not installed")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` refused: {made.stderr.strip()}")
    _run(["ip", "netns", "del", probe], check=False)


def cleanup_leftovers() -> list[str]:
    """Remove namespaces and links of ours whose creating process is gone (a crashed or killed earlier run)."""
    removed = []
    for ns in _netns_names():
        m = _NS_RE.match(ns) or re.match(rf"^{PREFIX}(\d+)-probe$", ns)
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns_pids(ns)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    for link in _link_names():
        m = _LINK_RE.match(link)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "link", "del", link], check=False)
            removed.append(link)
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}*-*")):
        m = re.match(rf"^{PREFIX}(\d+)-", os.path.basename(path))
        if m and os.path.isdir(path) and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.warning("removed leftovers of an earlier multi-node run: %s", removed)
    return removed


def _free_subnet_octet() -> int:
    """A third octet x with 10.213.x.0/24 overlapping no address or route of the root namespace."""
    used = []
    for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _run(["ip", "-4", "route", "show"]).stdout.splitlines():
        dest = line.split()[0]
        if dest != "default":
            used.append(ipaddress.ip_network(dest, strict=False))
    start = os.getpid() % 200 + 20
    for i in range(200):
        x = (start + i) % 200 + 20
        net = ipaddress.ip_network(f"{SUBNET_BASE}.{x}.0/24")
        if not any(net.overlaps(u) for u in used):
            return x
    raise RuntimeError(f"no free /24 under {SUBNET_BASE}.0.0/16")


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process still inside namespace `ns` (Ray workers the raylet forked, a stuck driver)."""
    for _ in range(3):
        pids = _netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _netns_pids(ns: str) -> list[int]:
    return [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed grandchild waits for the machine's init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr.strip()}")
    return run


def main() -> None:
    """By hand: `python -m tests.cluster.netns_cluster --worker-npus 4 --worker-cpus 4` serves tp=2 dp=2 on a
    cluster of the given shape and prints where each replica landed."""
    import argparse

    from tests.fixtures.producers import CACHE_ROOT
    from tests.fixtures.tiny_models import make_tiny

    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-npus", type=int, default=2)
    parser.add_argument("--worker-cpus", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model = make_tiny("llama", str(CACHE_ROOT))
    driver = [sys.executable, "-m", "tests.cluster.multinode_driver", "generate", "--model", model,
              "--prompts", json.dumps(["The capital of France is"])]
    with NetnsCluster(workers=args.workers, worker_npus=args.worker_npus, worker_cpus=args.worker_cpus) as cluster:
        run = cluster.run_in_head([*driver, "--address", cluster.address], timeout_s=300)
        if run.returncode != 0:
            sys.exit(f"driver failed:\n{run.stderr[-4000:]}\n{cluster.logs()}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        names = {n.ip: n.name for n in cluster.nodes}
        for i, ranks in enumerate(result["replicas"]):
            logger.info("replica %d: %s", i, [(r["rank"], r["node_ip"], names.get(r["node_ip"])) for r in ranks])
        logger.info("router on %s; head %s; timings %s", result["router_node_ip"], cluster.head.ip, result["timings"])
    logger.info("cluster %s; left after teardown: %s", cluster.timings, cluster.leftovers())


if __name__ == "__main__":
    main()
