"""The `shardserve generate` command as a user runs it: its own private local Ray, the embedded default model."""

from __future__ import annotations

import os
import subprocess
import sys


def test_generate_on_the_default_model():
    exe = os.path.join(os.path.dirname(sys.executable), "shardserve")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [exe, "generate", "The capital of France is", "--max-tokens", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(" Paris"), out.stdout
    # loading shows progress: each rank, a quarter of the layers at a time, through Ray to this terminal
    assert "rank 0/1 loading SmolLM2-135M-Instruct.Q4_1.gguf: layer 30/30" in out.stderr, out.stderr[-2000:]


def test_bad_tp_size_exits_with_the_reason():
    exe = os.path.join(os.path.dirname(sys.executable), "shardserve")
    out = subprocess.run([exe, "generate", "hi", "--tp-size", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "num_attention_heads=9 is not divisible" in out.stderr


# SGLang's Ascend command line from the seeds ("Quantization on Ascend", GGUF usage), with `shardserve serve` in
# place of `python3 -m sglang.launch_server`
SGLANG_ASCEND = ("--model-path Qwen3-14B-Q4_K_M.gguf --device npu --attention-backend ascend --host 0.0.0.0 "
                 "--port 30000 --mem-fraction-static 0.7 --tp-size 2").split()


def _parsed(monkeypatch, argv: list[str]):
    from shardserve.cluster import cli

    seen = {}
    monkeypatch.setattr(cli, "serve", lambda args: seen.setdefault("args", args))
    cli.main(["serve", *argv])
    return seen["args"]


def test_sglangs_ascend_command_line_is_taken_flag_for_flag(monkeypatch):
    args = _parsed(monkeypatch, SGLANG_ASCEND)
    assert (args.device, args.attention_backend, args.host, args.port) == ("npu", "ascend", "0.0.0.0", 30000)
    assert (args.mem_fraction_static, args.tp_size, args.model_path) == (0.7, 2, "Qwen3-14B-Q4_K_M.gguf")
    auto = _parsed(monkeypatch, ["--attention-backend", "ascend"])  # --device auto: ascend picks the NPU
    assert auto.device == "npu"


def test_unsupported_flags_and_backends_are_refused_by_name(monkeypatch, capsys):
    import pytest

    for argv, said in [
        (["--attention-backend", "fa3"], "invalid choice: 'fa3'"),
        (["--attention-backend", "ascend", "--device", "cpu"], "--attention-backend ascend runs on --device npu, not cpu"),
        (["--speculative-algorithm", "EAGLE"], "unrecognized arguments: --speculative-algorithm EAGLE"),
    ]:
        with pytest.raises(SystemExit) as e:
            _parsed(monkeypatch, argv)
        assert e.value.code == 2 and said in capsys.readouterr().err, argv


def test_a_local_ray_we_start_runs_its_workers_at_nice_0():
    """Ray's workers start at nice 15 unless told (worker_niceness): on a small host the driver's and Ray's own
    processes would preempt a rank's compute threads. init_ray's private local cluster runs them at nice 0."""
    script = (
        "import os, ray\n"
        "from shardserve.cluster.config import EngineConfig\n"
        "from shardserve.cluster.launch import init_ray\n"
        "init_ray(EngineConfig(device='cpu'))\n"
        "print('NICE', ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NICE 0" in out.stdout.split("\n"), out.stdout
