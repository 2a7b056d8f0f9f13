"""The scheduler: token budget and chunked prefill, max_num_seqs, preemption of the newest runner, and no hang
when a waiting sequence cannot get its blocks."""

from __future__ import annotations

import random

from shardserve.router.block_manager import BlockManager
from shardserve.router.sampling_params import SamplingParams
from shardserve.router.scheduler import Scheduler
from shardserve.router.sequence import Sequence, Status

BS = 4  # tokens per block
Batch = list[tuple[Sequence, int]]


def make_seq(seq_id: int, prompt: list[int], max_len: int, **params) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(prompt), SamplingParams(**params), max_len, None)


def make_scheduler(num_blocks: int, budget: int = 64, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget)


def run_step(sched: Scheduler, batch: Batch) -> None:
    """Play the worker and EngineCore.process: fed tokens are computed; a sequence at its end samples one."""
    for seq, n in batch:
        seq.num_computed += n
        sched.blocks.commit(seq.blocks, seq.tokens, seq.num_computed)
        if seq.num_computed == seq.num_tokens:
            seq.output_ids.append(1000 + len(seq.output_ids))
            if seq.num_tokens >= seq.max_len:
                sched.finish(seq)


def check(sched: Scheduler, batch: Batch) -> None:
    """What must hold after every schedule()."""
    bm = sched.blocks
    assert batch or not sched.has_work(), "an empty batch while there is work: the engine loop would sleep"
    seqs = [s for s, _ in batch]
    assert len(set(map(id, seqs))) == len(seqs)
    assert sum(n for _, n in batch) <= sched.token_budget and len(sched.running) <= sched.max_num_seqs
    for seq, n in batch:
        assert seq.status is Status.RUNNING and seq in sched.running and n > 0
        assert len(seq.blocks.table) * BS >= seq.num_computed + n
    for seq in sched.waiting:
        assert seq.status is Status.WAITING and seq.num_computed == 0 and not seq.blocks.table
    holders = [s.blocks.table for s in sched.running]
    for block in bm.blocks:
        assert block.ref_count == sum(t.count(block.id) for t in holders)
    assert set(bm.free) == {b.id for b in bm.blocks if b.ref_count == 0}


def drive(sched: Scheduler, max_steps: int = 200) -> int:
    """Schedule and run until there is no work; returns the steps taken."""
    for step in range(max_steps):
        if not sched.has_work():
            return step
        batch = sched.schedule()
        check(sched, batch)
        run_step(sched, batch)
    raise AssertionError(f"still working after {max_steps} steps")


def test_token_budget_splits_a_prefill_into_chunks() -> None:
    sched = make_scheduler(16, budget=8)
    a = make_seq(0, list(range(20)), max_len=22)
    sched.add(a)
    chunks = []
    for _ in range(5):
        batch = sched.schedule()
        chunks.append([n for _, n in batch])
        run_step(sched, batch)
    assert chunks == [[8], [8], [4], [1], []]
    assert a.status is Status.FINISHED and sched.blocks.num_free == 16


def test_runners_come_first_and_admissions_fill_the_rest_of_the_budget() -> None:
    sched = make_scheduler(16, budget=8)
    a = make_seq(0, list(range(3)), max_len=10)
    sched.add(a)
    run_step(sched, sched.schedule())
    b = make_seq(1, list(range(50, 70)), max_len=30)
    sched.add(b)
    assert [(s.seq_id, n) for s, n in sched.schedule()] == [(0, 1), (1, 7)]


def test_max_num_seqs_caps_the_running_set() -> None:
    sched = make_scheduler(16, max_num_seqs=2)
    seqs = [make_seq(i, [10 * i + 1, 10 * i + 2], max_len=3 + i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq_id for s, _ in batch] == [0, 1] and list(sched.waiting) == [seqs[2]]
    run_step(sched, batch)  # seq 0 reaches max_len and leaves
    assert [s.seq_id for s, _ in sched.schedule()] == [1, 2]


def test_the_newest_runner_is_preempted_to_the_front_of_waiting() -> None:
    sched = make_scheduler(4)
    old, new = make_seq(0, list(range(10, 18)), max_len=16), make_seq(1, list(range(20, 28)), max_len=16)
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())  # both prefilled: 2 full blocks each, the cache is full
    late = make_seq(2, [5, 6, 7], max_len=8)
    sched.add(late)
    batch = sched.schedule()  # old needs a third block
    check(sched, batch)
    assert [(s.seq_id, n) for s, n in batch] == [(0, 1)]
    assert list(sched.waiting) == [new, late]
    assert new.status is Status.WAITING and new.num_computed == 0 and new.num_preemptions == 1
    assert sched.blocks.stats.preemptions == 1
    drive(sched)
    assert all(s.status is Status.FINISHED for s in (old, new, late))
    assert sched.blocks.num_free == 4


def test_a_runner_that_cannot_grow_preempts_itself_last() -> None:
    """Victims come from the end of running, never from the sequences already in this step's batch."""
    sched = make_scheduler(3)
    seqs = [make_seq(i, list(range(10 * i, 10 * i + 4)), max_len=8) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched, sched.schedule())  # one block each, none free; each needs a second one now
    batch = sched.schedule()
    check(sched, batch)
    # seq 0 takes seq 2's block; seq 1 then finds none free and is itself the newest runner
    assert [(s.seq_id, n) for s, n in batch] == [(0, 1)]
    assert list(sched.waiting) == [seqs[1], seqs[2]]  # the older victim in front
    assert sched.blocks.stats.preemptions == 2
    drive(sched)
    assert sched.blocks.num_free == 3


def test_a_waiting_sequence_that_cannot_allocate_gives_its_prefix_back() -> None:
    sched = make_scheduler(4)
    bm = sched.blocks
    warm = make_seq(0, [1, 2, 3, 4, 5], max_len=6)  # leaves [1, 2, 3, 4] in the prefix cache
    sched.add(warm)
    drive(sched)
    big = make_seq(1, list(range(50, 62)), max_len=13)  # 3 blocks
    shared = make_seq(2, [1, 2, 3, 4] + list(range(60, 68)), max_len=13)  # 3 blocks, the first cached
    sched.add(big)
    sched.add(shared)
    batch = sched.schedule()
    check(sched, batch)
    assert [s for s, _ in batch] == [big] and list(sched.waiting) == [shared]
    assert shared.blocks.table == [] and shared.num_computed == 0
    assert bm.num_free == 1 and len(bm.cached) == 1  # the cached block is free again, still cached
    run_step(sched, batch)  # big samples its last token and leaves
    batch = sched.schedule()
    assert [s for s, _ in batch] == [shared] and shared.num_cached_tokens == 4
    # the failed try was not counted: each prompt once
    assert (bm.stats.prefix_queries, bm.stats.prefix_hits) == (5 + 12 + 12, 4)


def test_a_preempted_sequence_is_not_starved_by_a_waiting_prefix() -> None:
    """The hang: a waiting sequence kept the cached block it matched, the runner then ran out of blocks,
    was preempted in front of it and could never fit again; schedule() returned [] forever."""
    sched = make_scheduler(4)
    warm = make_seq(0, [1, 2, 3, 4, 5], max_len=6)  # leaves [1, 2, 3, 4] in the prefix cache
    sched.add(warm)
    drive(sched)
    runner = make_seq(1, list(range(50, 58)), max_len=16)  # grows to all 4 blocks
    sched.add(runner)
    run_step(sched, sched.schedule())
    blocked = make_seq(2, [1, 2, 3, 4] + list(range(60, 68)), max_len=13)  # matches the cached block
    sched.add(blocked)
    for _ in range(50):
        if not sched.has_work():
            break
        batch = sched.schedule()
        assert batch, "schedule() returned nothing while sequences wait: the engine loop would sleep forever"
        run_step(sched, batch)
    assert runner.status is blocked.status is Status.FINISHED
    assert runner.num_tokens == 16 and blocked.num_tokens == 13
    assert sched.blocks.num_free == 4


def test_a_preempted_sequence_recomputes_without_recounting_its_prefix() -> None:
    sched = make_scheduler(4)
    bm = sched.blocks
    # old never needs a fourth block, so the first block new committed stays cached for its readmission
    old, new = make_seq(0, list(range(10, 17)), max_len=12), make_seq(1, list(range(20, 27)), max_len=16)
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())
    stats = (bm.stats.prefix_queries, bm.stats.prefix_hits)
    drive(sched)  # new is preempted, then re-matches its own first block on readmission
    assert new.num_preemptions == 1 and new.num_cached_tokens == 0
    assert (bm.stats.prefix_queries, bm.stats.prefix_hits) == stats == (14, 0)


def test_prompt_logprob_requests_skip_the_cache() -> None:
    sched = make_scheduler(8)
    sched.add(make_seq(0, [1, 2, 3, 4, 5], max_len=6))
    drive(sched)
    seq = make_seq(1, [1, 2, 3, 4, 5], max_len=6, prompt_logprobs=0)
    sched.add(seq)
    assert sched.schedule() == [(seq, 5)]
    assert seq.num_computed == seq.num_cached_tokens == 0
    assert sched.blocks.stats.prefix_queries == 5  # the first request only


def test_finish_frees_a_sequence_wherever_it_is() -> None:
    sched = make_scheduler(4)
    a, b = make_seq(0, list(range(12)), max_len=16), make_seq(1, list(range(20, 32)), max_len=16)
    sched.add(a)
    sched.add(b)
    sched.schedule()  # a runs, b waits
    sched.finish(b)
    sched.finish(a)
    sched.finish(a)  # twice is harmless
    assert not sched.has_work() and sched.blocks.num_free == 4
    assert all(block.ref_count == 0 for block in sched.blocks.blocks)


def test_random_workloads_keep_the_invariants_and_finish() -> None:
    """Shared prefixes, a small cache, small budgets, arrivals and aborts at random steps."""
    for trial in range(20):
        rng = random.Random(trial)
        num_blocks = rng.randint(4, 8)
        sched = make_scheduler(num_blocks, budget=rng.randint(1, 12), max_num_seqs=rng.randint(1, 4))
        prefixes = [[rng.randint(1, 9) for _ in range(rng.randint(0, 9))] for _ in range(3)]
        pending = []
        for i in range(12):
            prompt = (rng.choice(prefixes) + [rng.randint(1, 9) for _ in range(rng.randint(1, 6))])[:14]
            pending.append(make_seq(i, prompt, max_len=rng.randint(len(prompt) + 1, num_blocks * BS)))
        live: list[Sequence] = []
        for _ in range(400):
            if pending and rng.random() < 0.3:
                live.append(pending.pop())
                sched.add(live[-1])
            if live and rng.random() < 0.05:
                sched.finish(live.pop(rng.randrange(len(live))))  # an abort between steps
            if not sched.has_work() and not pending:
                break
            batch = sched.schedule()
            check(sched, batch)
            run_step(sched, batch)
        else:
            raise AssertionError(f"trial {trial} did not finish")
        assert sched.blocks.num_free == num_blocks, trial
