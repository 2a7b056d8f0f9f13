"""A worker process killed mid-generation: its requests fail explicitly with the reason, nothing hangs."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from shardserve import LLM, SamplingParams


def test_killed_worker_fails_requests_explicitly(ray_session, smollm2_path):
    llm = LLM(smollm2_path, tp_size=3, device="cpu", kv_cache_memory_gb=0.1, cpu_threads_per_worker=1)
    try:
        pid = llm.info["workers"][0][1]["pid"]  # replica 0, rank 1
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        ref = llm.router.complete.remote("victim", params, prompt="Once upon a time")
        time.sleep(3)  # let it get into decode
        os.kill(pid, signal.SIGKILL)
        ready, _ = ray.wait([ref], timeout=120)
        assert ready, "the request hung after its worker died"
        deltas = ray.get(ref)
        assert deltas[-1].finish_reason == "error"
        assert "died" in deltas[-1].error or "Actor" in deltas[-1].error
        # the next request on the broken replica is failed too, not hung
        with pytest.raises(RuntimeError, match="failed"):
            llm.generate(["Hello"], SamplingParams(max_tokens=4))
    finally:
        llm.shutdown()
