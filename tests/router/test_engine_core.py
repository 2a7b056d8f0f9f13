"""EngineCore around the scheduler: a request aborted while its step runs leaves no trace when the step returns."""

from __future__ import annotations

from types import SimpleNamespace

from shardserve.router.engine import EngineCore
from shardserve.router.sampling_params import SamplingParams
from shardserve.workers.step import SeqResult, StepPlan, StepResult

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
