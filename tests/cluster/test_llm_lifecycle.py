"""An `LLM` gives back its router, workers and placement groups when closed, left by `with`, collected, or when
its start fails; a local Ray we start fits a second, larger engine; the serving context fits the KV cache."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys

import pytest
import ray
from safetensors.torch import load_file, save_file

from shardserve import LLM, SamplingParams
from shardserve.workers.loader import CheckpointError
from tests.fixtures.tiny_models import make_tiny

TINY = dict(device="cpu", kv_cache_memory_gb=0.05, cpu_threads_per_worker=1)


def _held() -> tuple[float, int, int]:
    """(CPUs in use, live placement groups, live actors) of the session's Ray."""
    cpus = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0)
    pgs = sum(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values())
    actors = sum(a["State"] != "DEAD" for a in ray.state.actors().values())
    return cpus, pgs, actors


def _settled() -> tuple[float, int, int]:
    """_held() once it stops changing: an earlier test's engine may still be dying (its actors reach DEAD in the
    GCS a moment after the kill), which would make it count in `before` and then vanish. Bounded."""
    import time

    deadline = time.monotonic() + 30
    last = _held()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _held()
        if now == last:
            return now
        last = now
    return last


def _wait_released(before: tuple[float, int, int]) -> None:
    """Actor deaths reach the GCS a moment after ray.kill: poll, bounded."""
    import time

    deadline = time.monotonic() + 30
    while _held() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _held() == before


@pytest.fixture
def tiny(cache_dir) -> str:
    return make_tiny("llama", cache_dir)


def test_close_and_with_release_everything(ray_session, tiny):
    before = _settled()
    llm = LLM(tiny, tp_size=2, **TINY)
    assert _held()[1] == before[1] + 1
    llm.close()
    llm.close()  # idempotent
    _wait_released(before)
    with LLM(tiny, tp_size=2, **TINY) as llm:
        assert llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    _wait_released(before)


def test_garbage_collected_llm_releases_everything(ray_session, tiny):
    before = _settled()
    llm = LLM(tiny, tp_size=2, **TINY)
    del llm
    gc.collect()
    _wait_released(before)


def test_failed_start_releases_what_it_took(ray_session, tiny, tmp_path):
    """A worker's load raises (a tensor is missing): the error names it, and nothing is left placed."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    before = _settled()
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(str(broken), tp_size=2, **TINY)
    _wait_released(before)
    with LLM(tiny, tp_size=4, **TINY) as llm:  # the next engine is not kept waiting
        assert llm.info["tp_size"] == 4


def test_serving_context_is_clamped_to_the_kv_cache(ray_session, smollm2_path):
    """SmolLM2's 8192-token context on a 16-block cache: served as 256 tokens, so a chat without max_tokens
    is admitted (it was refused: it needed more KV cache than exists)."""
    with LLM(smollm2_path, num_kv_blocks=16, **TINY) as llm:
        assert llm.info["max_model_len"] == 16 * 16
        out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=None, temperature=0))[0]
        assert out.outputs[0].finish_reason in ("stop", "length")


SECOND_ENGINE = r"""
import gc, sys
from shardserve import LLM, SamplingParams
model = sys.argv[1]
kw = dict(device="cpu", kv_cache_memory_gb=0.05, placement_timeout_s=30)
llm = LLM(model, **kw)  # starts the local Ray; TP=1 takes every real core (2 here)
del llm
gc.collect()
llm = LLM(model, tp_size=4, cpu_threads_per_worker=1, **kw)
print("OK", llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2))[0].outputs[0].token_ids)
"""


def test_a_second_larger_engine_fits_the_local_ray_we_start(tiny):
    """In a fresh process (Ray started by LLM itself): TP=1, dropped, then TP=4 places within 30 s (a Ray
    sized by the first engine alone had no room for it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", SECOND_ENGINE, tiny], capture_output=True, text=True,
                         timeout=400, env=env)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
