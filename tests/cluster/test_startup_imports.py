"""What a start does not do: the driver reading the checkpoint's config and the router's process creating worker
actors import no torch (each import is ~1.5 s of a 2-core machine's start; only the workers need it), and the
`shardserve` command's module imports neither the HTTP stack nor Ray before it runs (fastapi and the request
models are the router actor's: 0.35 s of the driver's start, before Ray's own)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
from shardserve.cluster import launch, replica  # the driver's start_router; the router's replica and actor class
from shardserve.cluster.config import EngineConfig
from shardserve.router import router
from shardserve.workers.actor import Worker as WorkerActor

cfg = launch._checked_model_config(EngineConfig(model_path=sys.argv[1], tp_size=3))
print("RESULT " + json.dumps({"architecture": cfg.architecture, "torch": "torch" in sys.modules,
                              "methods": sorted(m for m in dir(WorkerActor) if not m.startswith("_"))}))
"""


def test_the_driver_and_the_router_import_no_torch(smollm2_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, smollm2_path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["architecture"] == "llama" and result["torch"] is False
    from shardserve.workers.actor import METHODS
    from shardserve.workers.worker import Worker

    assert result["methods"] == sorted(METHODS)
    assert all(callable(getattr(Worker, m)) for m in METHODS)  # each forwards to a Worker method that exists


def test_a_tp_size_the_model_cannot_take_is_refused_from_the_config_alone(smollm2_path):
    import pytest

    from shardserve.cluster import launch
    from shardserve.cluster.config import EngineConfig

    with pytest.raises(ValueError, match="num_attention_heads=9 is not divisible"):
        launch._checked_model_config(EngineConfig(model_path=smollm2_path, tp_size=2))


def test_the_command_line_imports_no_http_stack_or_ray():
    code = ("import sys; import shardserve.cluster.cli; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'pydantic', 'ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
