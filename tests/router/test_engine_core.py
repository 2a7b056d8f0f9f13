"""EngineCore around the scheduler: a request aborted while its step runs leaves no trace when the step returns."""

from __future__ import annotations

from types import SimpleNamespace

from shardserve.router.engine import EngineCore
from shardserve.router.sampling_params import SamplingParams
from shardserve.workers.step import PENDING, SeqResult, StepPlan, StepResult

NUM_BLOCKS, BS = 8, 4
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


class FakeTokenizer:
    """One letter per id: all IncrementalDetokenizer and the stop checks ask of a tokenizer."""

    stop_token_ids = [0]
    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def make_core(prefix_caching: bool = True) -> EngineCore:
    cfg = SimpleNamespace(enable_prefix_caching=prefix_caching, max_num_seqs=4, max_num_batched_tokens=64)
    return EngineCore(FakeTokenizer(), NUM_BLOCKS, BS, max_model_len=32, vocab_size=50, cfg=cfg)


def results(plan: StepPlan, token: int = 7) -> StepResult:
    """What rank 0 returns: a token for every sequence that samples."""
    return StepResult([SeqResult(s.seq_id, token_id=token, logprob=-0.5) for s in plan.seqs if s.sample])


def assert_refs_consistent(core: EngineCore) -> None:
    held = [s.blocks.table for seqs in core.requests.values() for s in seqs]
    for block in core.blocks.blocks:
        assert block.ref_count == sum(t.count(block.id) for t in held)


def test_abort_mid_step_drops_the_result_and_frees_the_blocks() -> None:
    core = make_core()
    core.add_request("a", list(range(1, 10)), GREEDY)
    plan = core.schedule()
    aborted = core.abort("a")
    assert [(d.request_id, d.finish_reason) for d in aborted] == [("a", "abort")]
    assert core.blocks.num_free == NUM_BLOCKS  # given back at once, while the step still runs
    assert core.process(results(plan)) == []
    assert core.blocks.num_free == NUM_BLOCKS and core.blocks.cached == {}  # nothing committed either
    assert not core.has_work() and core.schedule() is None


def test_abort_mid_step_leaves_a_sharing_request_intact() -> None:
    core = make_core()
    prompt = list(range(1, 10))
    core.add_request("first", prompt, GREEDY)
    core.process(results(core.schedule()))  # "first" has committed its two full prompt blocks
    core.add_request("second", prompt, SamplingParams(n=2, max_tokens=4, temperature=0, ignore_eos=True))
    plan = core.schedule()
    assert core.requests["second"][0].num_cached_tokens == 8
    core.abort("first")
    assert_refs_consistent(core)
    deltas = core.process(results(plan))
    assert {(d.request_id, d.index) for d in deltas} == {("second", 0), ("second", 1)}
    assert core.abort("first") == []  # already gone
    while core.has_work():
        core.process(results(core.schedule()))
        assert_refs_consistent(core)
    assert core.blocks.num_free == NUM_BLOCKS and core.requests == {}


def test_abort_of_a_request_of_n_samples_mid_step_spares_the_others() -> None:
    core = make_core(prefix_caching=False)
    core.add_request("a", [1, 2, 3], SamplingParams(n=2, max_tokens=2, temperature=0, ignore_eos=True))
    core.add_request("b", [4, 5, 6], GREEDY)
    plan = core.schedule()
    core.abort("a")
    deltas = core.process(results(plan))
    assert [d.request_id for d in deltas] == ["b"]
    assert_refs_consistent(core)


# ---- two steps in flight (the router's overlap schedule) -----------------------------------------------------
def test_the_next_step_feeds_the_token_in_flight_as_pending_and_counts_it() -> None:
    core = make_core()
    core.add_request("a", list(range(1, 7)), SamplingParams(max_tokens=4, temperature=0.7, seed=3, ignore_eos=True))
    first = core.schedule()  # the prompt, sampling the first token
    second = core.schedule()  # sent before the first returns
    (s1,), (s2,) = first.seqs, second.seqs
    assert s1.token_ids == list(range(1, 7)) and s1.sample and s1.num_generated == 0
    assert s2.token_ids == [PENDING] and s2.start_pos == 6 and s2.sample
    assert s2.num_generated == 1  # the seeded draw of the second token, whatever the first one is
    assert core.steps_in_flight == 2
    assert [d.token_ids for d in core.process(results(first, token=11))] == [[11]]
    third = core.schedule()  # the first token is known now; the second is still in flight
    assert third.seqs[0].token_ids == [PENDING] and third.seqs[0].start_pos == 7
    core.process(results(second, token=12))
    core.process(results(third, token=13))
    plan = core.schedule()  # nothing in flight: every fed token is known
    assert plan.seqs[0].token_ids == [13]
    (seq,) = core.requests["a"]
    assert seq.output_ids == [11, 12, 13] and seq.num_pending == 1


def test_a_sequence_whose_token_in_flight_is_its_last_is_not_scheduled_again() -> None:
    core = make_core()
    core.add_request("a", list(range(1, 7)), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    first = core.schedule()
    assert core.schedule() is None  # max_tokens=1: the prompt's step samples the only token
    (d,) = core.process(results(first))
    assert d.finish_reason == "length" and not core.has_work()


def test_a_stop_in_the_first_step_drops_the_second_steps_token_and_frees_the_blocks() -> None:
    core = make_core()
    core.add_request("a", list(range(1, 7)), SamplingParams(max_tokens=8, temperature=0))
    first, second = core.schedule(), core.schedule()
    (d,) = core.process(results(first, token=0))  # EOS
    assert d.finish_reason == "stop" and d.token_ids == [0]
    assert core.process(results(second, token=5)) == []  # computed past the end: dropped
    assert core.blocks.num_free == NUM_BLOCKS and not core.requests and core.schedule() is None


def test_blocks_are_committed_to_the_prefix_cache_only_as_far_as_the_returned_steps_computed() -> None:
    core = make_core()
    core.add_request("a", list(range(1, 8)), GREEDY)  # 7 tokens: one full block of 4
    first, second = core.schedule(), core.schedule()
    (seq,) = core.requests["a"]
    assert seq.num_computed == 8 and len(seq.blocks.hashes) == 0  # counted ahead, committed when they return
    core.process(results(first, token=9))
    assert len(seq.blocks.hashes) == 1
    core.process(results(second, token=9))
    assert len(seq.blocks.hashes) == 2  # [5 6 7 9] is full and computed: the second step fed the 9
    assert seq.blocks.hashes[1] == hash((seq.blocks.hashes[0], (5, 6, 7, 9)))


def test_a_preempted_sequence_keeps_the_token_in_flight_and_waits_for_it_before_readmission() -> None:
    core = make_core()
    core.add_request("a", list(range(1, 8)), GREEDY)
    first = core.schedule()
    (seq,) = core.requests["a"]
    core.scheduler.running.remove(seq)
    core.scheduler._preempt(seq)  # as when another sequence needs its blocks
    assert core.schedule() is None  # its token is in flight: not readmitted yet
    (d,) = core.process(results(first, token=9))
    assert d.token_ids == [9] and seq.output_ids == [9] and seq.num_pending == 0
    plan = core.schedule()  # recomputed from the prompt and the output so far
    assert plan.seqs[0].token_ids == [*range(1, 8), 9] and plan.seqs[0].start_pos == 0
