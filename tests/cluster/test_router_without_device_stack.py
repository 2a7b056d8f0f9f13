"""The router places NPU workers without importing torch_npu: a CPU head node (KubeRay) has none.

The workers import the test-only torch_npu EMULATION (tests/npu_emulation) through the job's runtime_env; the
process that builds the replica, as the router actor does, cannot import torch_npu at all. This checks our
placement plumbing, not Ascend hardware.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.fixtures.tiny_models import make_tiny
from tests.workers.device.conftest import EMULATION_DIR

SCRIPT = r"""
import asyncio, json, sys
sys.modules["torch_npu"] = None  # `import torch_npu` raises here, as on a CPU head node
import ray
from shardserve.cluster.config import EngineConfig
from shardserve.cluster.launch import build_replica, load_tokenizer
from shardserve.workers.loader import open_checkpoint
from shardserve.workers.step import SeqStep, StepPlan
from shardserve.workers.worker import Worker

emulation, model = sys.argv[1], sys.argv[2]
plan = StepPlan([SeqStep(0, [5, 17, 42, 9, 77, 3], 0, [0], True)])
reference = Worker(model, "cpu", "float32", None, 0, 1)  # in-process, on the cpu backend
reference.init("127.0.0.1", 0)
reference.init_cache(4, 16)
expected = reference.execute(plan).results[0].token_id

ray.init(address="local", num_cpus=4, resources={"NPU": 1}, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": emulation}})
cfg = EngineConfig(model_path=model, device="npu", dtype="float32", num_kv_blocks=4, mem_fraction_static=0.2,
                   cpu_threads_per_worker=1)
_, model_cfg = open_checkpoint(model)
replica, core = build_replica(cfg, load_tokenizer(model), 0, model_cfg=model_cfg)
got = asyncio.run(replica.execute(plan)).results[0].token_id
replica.shutdown()
print("RESULT " + json.dumps({"got": got, "expected": expected, "device": replica.device,
                              "torch_npu_loaded": sys.modules.get("torch_npu") is not None}))
"""


def test_replica_places_npu_workers_without_torch_npu(cache_dir):
    model = make_tiny("llama", cache_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("ASCEND_RT_VISIBLE_DEVICES", "RAY_ADDRESS")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, EMULATION_DIR, model], capture_output=True, text=True,
                         timeout=300, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["device"] == "npu" and not result["torch_npu_loaded"]
    assert result["got"] == result["expected"]  # the emulated-NPU worker's greedy token, as on the cpu backend
