"""Replicas with prefix affinity: a request goes to the replica holding the longest cached prefix of its prompt,
else to the least loaded; affinity yields to balance past SGLang's thresholds. The routing rule on its own, then
two real replicas (Ray actors) of the tiny llama behind one router."""

from __future__ import annotations

import random

import prometheus_client
import pytest

from shardserve import LLM, SamplingParams
from shardserve.router.affinity import BALANCE_ABS, RoutedPrefixes, choose
from shardserve.router.block_manager import BlockManager, SeqBlocks, prompt_block_hashes
from tests.fixtures.tiny_models import make_tiny

BLOCK = 16


def test_choose_prefers_the_longest_prefix_then_the_least_loaded():
    assert (choose([3, 0], [0, 0]).index, choose([3, 0], [0, 0]).by_prefix) == (1, False)  # no prefix: least loaded
    c = choose([3, 0], [4, 1])
    assert (c.index, c.by_prefix, c.matched_blocks) == (0, True, 4)  # busier, but holds more of the prompt
    assert choose([2, 1, 0], [4, 4, 0]).index == 1  # equal prefixes: the less loaded of them


def test_affinity_yields_to_balance_past_the_thresholds():
    gap = BALANCE_ABS + 1
    assert choose([gap, 0], [5, 0]).by_prefix is False  # gap over 32 and over 1.5x: the least loaded
    assert choose([gap + 100, 100], [5, 0]).index == 0  # gap over 32 but under 1.5x: the prefix still wins
    assert choose([BALANCE_ABS, 0], [5, 0]).index == 0


def test_routed_prefixes_match_leading_blocks_and_forget_the_oldest():
    a = prompt_block_hashes(list(range(100)), BLOCK)  # 99 tokens that may be cached: 6 full blocks
    assert len(a) == 6
    routed = RoutedPrefixes(capacity=8)
    routed.record(a)
    assert routed.matched(a) == 6
    b = prompt_block_hashes(list(range(48)) + [7] * 52, BLOCK)  # shares 3 blocks with a
    assert routed.matched(b) == 3
    routed.record(prompt_block_hashes(list(range(200, 300)), BLOCK))  # 6 more: the 4 oldest of a go
    assert routed.matched(a) == 0 and len(routed.hashes) == 8


def test_block_hashes_are_the_prefix_caches():
    """The router's hashes name the blocks the replica's prefix cache holds: what it matches, the cache serves."""
    blocks = BlockManager(num_blocks=16, block_size=BLOCK)
    tokens = list(range(70))
    seq = SeqBlocks()
    assert blocks.allocate(seq, len(tokens))
    blocks.commit(seq, tokens, len(tokens))
    hashes = prompt_block_hashes(tokens + [1, 2], BLOCK)
    assert blocks.cached_blocks(hashes) == 4  # the 4 full blocks of the 70 computed tokens
    fresh = SeqBlocks()
    assert blocks.match_prefix(fresh, tokens + [1, 2]) == 4 * BLOCK


@pytest.fixture(scope="module")
def two_replicas(ray_session, cache_dir):
    with LLM(make_tiny("llama", cache_dir), dp_size=2, device="cpu", kv_cache_memory_gb=0.05,
             cpu_threads_per_worker=1) as llm:
        yield llm


def test_requests_sharing_a_prefix_go_to_the_replica_that_holds_it(two_replicas):
    """Two long prefixes P and Q, first one request each (they land on the two replicas by load), then a burst of
    three of each with other suffixes, concurrent (P P P Q Q Q): each goes to its prefix's replica (counted),
    and every full block of its prefix is served from that replica's cache. Least-loaded routing alone would
    alternate the burst over the two replicas and miss the cache for half of it."""
    llm = two_replicas
    rng = random.Random(0)
    prefix = {k: [rng.randrange(5, 300) for _ in range(80)] for k in "PQ"}  # 5 full blocks each
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    before = llm.stats()
    llm.generate([{"prompt_token_ids": prefix[k] + [9, 9]} for k in "PQ"], params)
    first = llm.stats()
    assert [r["load"] - b["load"] for r, b in zip(first["routed"], before["routed"])] == [1, 1]
    burst = [{"prompt_token_ids": prefix[k] + [10 + i, 11]} for k in "PQ" for i in range(3)]
    outputs = llm.generate(burst, params)
    after = llm.stats()
    assert after["routed_by_prefix"] - first["routed_by_prefix"] == 6
    assert [r["prefix"] - f["prefix"] for r, f in zip(after["routed"], first["routed"])] == [3, 3]
    assert all(o.num_cached_tokens == 80 for o in outputs)  # the prefix's 5 blocks, from the replica holding them
    assert after["free_blocks"] == after["total_blocks"] and after["running"] == 0


def test_metrics_count_the_routing(two_replicas):
    from shardserve.cluster.server import _Metrics

    metrics = _Metrics("m")
    metrics.update(two_replicas.stats())
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert 'shardserve_routed_requests{reason="prefix",replica="0"} 3.0' in text
    assert 'shardserve_routed_requests{reason="load",replica="1"} 1.0' in text
