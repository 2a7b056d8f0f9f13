"""A worker process killed mid-generation: its replica is torn down and rebuilt, its requests are recomputed
once on a serving replica (the client sees the same greedy tokens), a second failure fails them explicitly,
and nothing hangs. Real Ray actors, real SIGKILLs."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from shardserve import LLM, SamplingParams
from tests.fixtures.tiny_models import make_tiny

# the tiny random llama (4 heads, 2 KV heads, context 512): loads in seconds, decodes in milliseconds, so a
# long generation is still running when its worker is killed
LONG = SamplingParams(max_tokens=480, temperature=0, ignore_eos=True)
PROMPT = {"prompt_token_ids": [5, 17, 42, 9]}
WAIT_S = 240.0  # bound on any wait below: load + rebuild on 2 shared cores
ENGINE = dict(device="cpu", kv_cache_memory_gb=0.05, cpu_threads_per_worker=1)


def _health(llm: LLM) -> dict:
    return ray.get(llm.router.health.remote())


def _wait(cond, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _pid(llm: LLM, replica: int, rank: int) -> int:
    return ray.get(llm.router.get_info.remote())["workers"][replica][rank]["pid"]


def _wait_tokens(llm: LLM, n: int) -> None:
    _wait(lambda: llm.stats()["generation_tokens"] >= n, f"{n} generated tokens")


def _live_placement_groups() -> int:
    return sum(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values())


@pytest.fixture
def tiny(cache_dir) -> str:
    return make_tiny("llama", cache_dir)


def _complete(llm: LLM, request_id: str, params: SamplingParams = LONG):
    return llm.router.complete.remote(request_id, params, prompt=PROMPT["prompt_token_ids"])


def test_killed_rank_is_rebuilt_and_its_request_retried(ray_session, tiny):
    """TP=2: SIGKILL rank 1 mid-decode (rank 0 is then blocked in a collective). The request finishes with the tokens an undisturbed run gives; the
    replica is unhealthy while rebuilt (no replica can serve: health not ok), then serves again; the dead
    group's placement group is gone."""
    pgs_before = _live_placement_groups()
    with LLM(tiny, tp_size=2, **ENGINE) as llm:
        expected = llm.generate([PROMPT], LONG)[0].outputs[0].token_ids
        old_pid = _pid(llm, 0, 1)
        before = llm.stats()["generation_tokens"]
        ref = _complete(llm, "victim")
        _wait_tokens(llm, before + 5)  # into decode
        os.kill(old_pid, signal.SIGKILL)
        _wait(lambda: not _health(llm)["ok"], "the replica to be marked unhealthy", timeout=60)
        ready, _ = ray.wait([ref], timeout=WAIT_S)
        assert ready, "the request hung after its worker died"
        deltas = ray.get(ref)
        assert [d.error for d in deltas if d.error] == []
        assert deltas[-1].finish_reason == "length"
        assert [t for d in deltas for t in d.token_ids] == expected  # recomputed, no gap and no repeat
        assert _health(llm) == {"ok": True, "replicas": ["serving"]}
        stats = llm.stats()
        assert (stats["replica_failures"], stats["requests_retried"], stats["replica_rebuilds"]) == (1, 1, 1)
        assert stats["free_blocks"] == stats["total_blocks"]
        assert _pid(llm, 0, 1) != old_pid
        assert _live_placement_groups() == pgs_before + 1  # the new group only
        # the rebuilt replica serves new requests
        short = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        assert llm.generate([PROMPT], short)[0].outputs[0].token_ids == expected[:8]
    assert _live_placement_groups() == pgs_before


def test_second_failure_fails_the_request_explicitly(ray_session, tiny):
    """A request is retried once: killing its new replica's worker too fails it with the reason, promptly."""
    with LLM(tiny, **ENGINE) as llm:
        ref = _complete(llm, "victim")
        _wait_tokens(llm, 5)
        os.kill(_pid(llm, 0, 0), signal.SIGKILL)
        _wait(lambda: llm.stats()["replica_rebuilds"] == 1, "the rebuild")
        retried = llm.stats()["generation_tokens"]
        _wait_tokens(llm, retried + 5)  # the retried request decodes on the new replica
        os.kill(_pid(llm, 0, 0), signal.SIGKILL)
        ready, _ = ray.wait([ref], timeout=WAIT_S)
        assert ready, "the twice-failed request hung"
        last = ray.get(ref)[-1]
        assert last.finish_reason == "error"
        assert "failed again after a retry" in last.error and "died" in last.error
        _wait(lambda: _health(llm)["ok"], "the second rebuild")
        again = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)  # a random model may sample EOS at T=1
        assert llm.generate([PROMPT], again)[0].outputs[0].finish_reason == "length"


def test_dp2_moves_requests_off_a_dead_replica(ray_session, tiny):
    """Two replicas: replica 0's worker dies mid-decode; its requests finish on replica 1 with the same
    tokens, new requests avoid the dead replica (it holds no requests, so least-loaded used to pick it), and
    health stays ok throughout."""
    with LLM(tiny, dp_size=2, **ENGINE) as llm:
        expected = llm.generate([PROMPT], LONG)[0].outputs[0].token_ids
        refs = [_complete(llm, f"r{i}") for i in range(2)]  # one per replica
        before = llm.stats()["generation_tokens"]
        _wait_tokens(llm, before + 10)
        os.kill(_pid(llm, 0, 0), signal.SIGKILL)
        _wait(lambda: _health(llm)["replicas"][0] != "serving", "replica 0 to be marked unhealthy", timeout=60)
        assert _health(llm)["ok"]
        during = llm.generate([PROMPT] * 3, LONG)  # replica 1 takes them while replica 0 rebuilds
        assert all(o.outputs[0].token_ids == expected for o in during)
        for deltas in ray.get(refs, timeout=WAIT_S):
            assert [t for d in deltas for t in d.token_ids] == expected
        _wait(lambda: _health(llm)["replicas"] == ["serving", "serving"], "replica 0's rebuild")
