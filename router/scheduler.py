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
        """This step's (sequence, new tokens) pairs; every sequence may join or leave at any step.

        Never empty while there is work: waiting sequences hold no blocks, so with nothing running the head
        of waiting has the whole cache, which EngineCore.add_request checked it fits in.
        """
        budget, batch = self.token_budget, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0 or seq.num_tokens >= seq.max_len:
                i += 1  # its step in flight computes all it has; or the token that step samples is its last
                continue
            while not self.blocks.allocate(seq.blocks, seq.num_computed + n):
                # the newest runner gives its blocks back; it sits at index >= i, so it is not in the batch yet
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted while a step in flight samples for it: readmitted once that token is known
            n = self._admit(seq, budget)
            if not n:
                break  # first come, first served: wait for blocks to free up
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Match the prefix cache and take the blocks of a first chunk; returns its size, or 0 holding nothing.

        Waiting sequences hold no blocks: a prefix kept by a waiting sequence could leave a sequence
        preempted in front of it unable ever to fit, with nothing running to free blocks.
        """
        # prompt logprobs need every prompt position computed, so such requests skip the cache
        use_cache = not seq.wants_prompt_logprobs
        cached = self.blocks.match_prefix(seq.blocks, seq.tokens) if use_cache else 0
        n = min(seq.num_tokens - cached, budget)
        if not self.blocks.allocate(seq.blocks, cached + n):
            self.blocks.release(seq.blocks)  # re-matched on the next try
            return 0
        seq.num_computed = cached
        if seq.num_preemptions == 0:  # a prompt is counted once: not on retries, nor on recompute
            seq.num_cached_tokens = cached
            if use_cache:
                self.blocks.stats.prefix_queries += len(seq.prompt_ids)
                self.blocks.stats.prefix_hits += cached
        return n

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
