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
