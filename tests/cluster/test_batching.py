"""Continuous batching through the router: concurrency changes nothing, blocks come back, prefixes are reused,
preemption under a small KV cache recomputes to the same result.

The engines here load SmolLM2 with --gguf-dequantize (fp32 weights): these tests check the scheduler, whose
every decision must leave the tokens unchanged. Kept quantized (the default), the CPU kernels round activations
to bf16, which turns the last-bit differences of a differently padded attention batch into bf16 steps: greedy
tokens can then differ at near-ties between batch compositions (as on GPUs, batching is not bit-invariant)."""

from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "def fibonacci(n):",
    "The best way to learn a language is to speak it every day with people who",
    "1, 2, 3,",
    "Water boils at",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms",
    "Q: What is 2 + 2?\nA:",
    "The quick brown fox",
    "Roses are red, violets are",
    "Machine learning is",
    "The largest planet in the solar system is",
    "Once upon a time",
    "import numpy as np\nimport torch\n\ndef main():",
    "My favourite food is",
    "The theory of relativity was developed by",
]


@pytest.fixture(scope="module")
def llm(ray_session, smollm2_path):
    engine = LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.25, cpu_threads_per_worker=2, gguf_dequantize=True)
    yield engine
    engine.shutdown()


def test_16_concurrent_equal_one_at_a_time(llm):
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert together == alone
    stats = llm.stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    assert stats["running"] == stats["waiting"] == 0
    # every step's time as the router waited for it, and rank 0's forward within it (benchmarks split the two)
    assert stats["step_seconds"] > stats["forward_seconds"] > 0


def test_shared_prefix_is_served_from_the_cache(llm):
    system = "You are a helpful assistant who answers questions about geography briefly and precisely. " * 3
    first = llm.generate([system + "What is the capital of Spain?"], GREEDY)[0]
    before = llm.stats()["prefix_hits"]
    second = llm.generate([system + "What is the capital of Italy?"], GREEDY)[0]
    hits = llm.stats()["prefix_hits"] - before
    a, b = first.prompt_token_ids, second.prompt_token_ids
    common = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    assert second.num_cached_tokens == common // 16 * 16 >= 32  # every full block of the shared prefix
    assert hits == second.num_cached_tokens
    # the cached prefix gives the tokens a fresh computation gives
    again = llm.generate([{"prompt_token_ids": second.prompt_token_ids}], GREEDY)[0]
    assert again.outputs[0].token_ids == second.outputs[0].token_ids


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    a = llm.generate(["Write a word:"] * 3, p)
    assert a[0].outputs[0].token_ids == a[1].outputs[0].token_ids == a[2].outputs[0].token_ids


def test_stop_strings_and_logprobs(llm):
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=20, temperature=0, stop=[" 7"], logprobs=2))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == " 7"
    assert c.text == " 5, 6,", c.text
    assert len(c.logprobs) == len(c.token_ids)
    for tid, pos in zip(c.token_ids, c.logprobs):
        assert pos[tid].rank == 1  # greedy: the sampled token is the top one


def test_prompt_logprobs_match_teacher_forced_scores(llm):
    ids = llm.generate(["The capital of France is Paris, and"], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    scores = llm.score(ids.prompt_token_ids).log_softmax(-1)
    assert ids.prompt_logprobs[0] is None
    for k, pos in enumerate(ids.prompt_logprobs[1:], start=1):
        tid = ids.prompt_token_ids[k]
        assert abs(pos[tid].logprob - scores[k - 1, tid].item()) < 1e-4


def test_preemption_and_chunked_prefill_give_the_same_tokens(ray_session, smollm2_path, llm):
    """12 blocks of 16 tokens for 16 requests, and a 24-token step budget: the scheduler must preempt and
    split prompts into chunks, and neither may change the outputs or the prompt logprobs."""
    reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    lp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    long_prompt = PROMPTS[6]
    ref_lp = llm.generate([long_prompt], lp)[0].prompt_logprobs
    small = LLM(smollm2_path, device="cpu", num_kv_blocks=12, max_num_batched_tokens=24, cpu_threads_per_worker=2,
                gguf_dequantize=True, enable_prefix_caching=False)
    try:
        # whether a round preempts depends on how the 16 requests reach the router (all before its first step, or
        # some during it): seen once in three full-suite runs without. Up to 3 rounds (no prefix cache, so each
        # has the same pressure), each checked; at least one must have preempted
        for _ in range(3):
            got = [o.outputs[0].token_ids for o in small.generate(PROMPTS, GREEDY)]
            assert got == reference
            stats = small.stats()
            if stats["preemptions"] > 0:
                break
        chunked = small.generate([long_prompt], lp)[0]
    finally:
        small.shutdown()
    assert len(chunked.prompt_token_ids) > 24  # really split over steps
    for a, b in zip(chunked.prompt_logprobs[1:], ref_lp[1:]):
        (tid, x), (_, y) = next(iter(a.items())), next(iter(b.items()))
        assert abs(x.logprob - y.logprob) < 1e-4 and tid in b
    assert stats["preemptions"] > 0
    assert stats["free_blocks"] == stats["total_blocks"]


def test_the_overlap_schedule_changes_no_output(ray_session, smollm2_path, llm):
    """The router sends step N+1 while step N runs, its decode inputs PENDING until the worker fills in what step N
    sampled. Waiting for each step instead (--disable-overlap-schedule) must give the same tokens, seeded draws,
    stop-string cuts and logprobs; a score sent while steps are in flight returns between them, unchanged."""
    import ray

    params = [
        GREEDY,
        SamplingParams(max_tokens=12, temperature=0.9, seed=11, n=2, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop=[" the", "."], logprobs=2),
        SamplingParams(max_tokens=1, temperature=0),
    ]
    prompts = PROMPTS[:4]

    def outputs(engine):
        return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in r.outputs]
                for r in engine.generate(prompts, params)]

    def same(a, b):  # tokens, text and reasons exact; logprobs to float32 rounding (steps batch differently)
        assert [len(r) for r in a] == [len(r) for r in b]
        for (ta, xa, fa, la), (tb, xb, fb, lb) in zip((c for r in a for c in r), (c for r in b for c in r)):
            assert (ta, xa, fa) == (tb, xb, fb)
            assert (la is None) == (lb is None)
            for pa, pb in zip(la or [], lb or []):
                assert pa.keys() == pb.keys()
                assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 and pa[t].rank == pb[t].rank for t in pa)

    ids = llm.generate([PROMPTS[0]], GREEDY)[0].prompt_token_ids
    alone = llm.score(ids)
    pipelined = outputs(llm)
    # a score among steps in flight: 16 requests generating, the score sent after them
    refs = [llm.router.complete.remote(f"busy-{i}", GREEDY, prompt=p) for i, p in enumerate(PROMPTS)]
    busy = llm.router.score.remote(ids)
    ray.get(refs)
    assert ray.get(busy).equal(alone)
    waited = LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.25, cpu_threads_per_worker=2, gguf_dequantize=True,
                 disable_overlap_schedule=True)
    try:
        same(outputs(waited), pipelined)
    finally:
        waited.shutdown()
