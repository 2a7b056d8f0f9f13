"""Continuous batching: running sequences first, then admissions, under a token budget (chunked prefill);
preempt-and-recompute the newest runner when KV blocks run out."""

from __future__ import annotations

from collections import deque

from shardserve.router.block_manager import BlockManager
from shardserve.router.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, new tokens) pairs; every sequence may join or leave at any step."""
        budget, batch = self.token_budget, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.allocate(seq.blocks, seq.num_computed + n):
                victim = self.running.pop()  # the newest runner gives its blocks back
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.blocks.table and not seq.wants_prompt_logprobs:
                # (prompt logprobs need every prompt position computed, so such requests skip the cache)
                seq.num_cached_tokens = self.blocks.match_prefix(seq.blocks, seq.tokens)
                seq.num_computed = seq.num_cached_tokens
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.allocate(seq.blocks, seq.num_computed + n):
                break  # wait for blocks to free up; the cached prefix stays held until then
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        self.blocks.stats.preemptions += 1
        seq.preempt()
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.status = Status.FINISHED
