"""A sequence's state in the router: tokens, progress through the KV cache, blocks, detokenizer, logprobs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from shardserve.router.block_manager import SeqBlocks
from shardserve.router.outputs import PositionLogprobs
from shardserve.router.sampling_params import SamplingParams
from shardserve.workers.step import PENDING


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + output may not pass this (max_model_len or prompt + max_tokens)
    detokenizer: Any
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache, or will be once the steps sent so far have run
    num_pending: int = 0  # tokens sampled by steps sent but not yet returned (their ids are not known here yet)
    epoch: int = 0  # preemptions and hand-overs so far: a step's result for an earlier epoch commits nothing
    blocks: SeqBlocks = field(default_factory=SeqBlocks)
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    emitted_text: int = 0  # characters of detokenizer.text already streamed
    sent_prompt: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final_text: str | None = None  # set when a stop string cuts the text

    @property
    def tokens(self) -> list[int]:
        """Prompt and output ids, then PENDING for each token a step in flight samples (the worker fills it in)."""
        return self.prompt_ids + self.output_ids + [PENDING] * self.num_pending

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has or will have once the steps in flight return."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    def preempt(self) -> None:
        """Back to waiting; its KV is dropped and recomputed (prompt and outputs) on readmission."""
        self.status = Status.WAITING
        self.num_computed = 0
        self.epoch += 1
        self.num_preemptions += 1
        if self.wants_prompt_logprobs:
            self.prompt_logprobs.clear()
