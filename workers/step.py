"""The step protocol: one plan per iteration from the router to every rank of a TP group, results from rank 0."""

from __future__ import annotations

from dataclasses import dataclass, field

# A fed token whose id the router does not know yet: the one this rank's previous step sampled for the sequence.
# The router sends step N+1 while step N runs (router/router.py), so a decoding sequence's next input is this.
PENDING = -1


@dataclass
class SeqStep:
    """One sequence's share of a step: a prefill chunk or one decode token."""

    seq_id: int
    token_ids: list[int]  # the new tokens fed this step; the last may be PENDING
    start_pos: int  # position of token_ids[0] (tokens before it are in the KV cache)
    block_table: list[int]  # KV blocks covering positions [0, start_pos + len(token_ids))
    sample: bool  # sample a next token after this chunk (decode, or the last prefill chunk)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    num_generated: int = 0  # output tokens so far: with `seed`, makes sampling a pure function of the step
    logprobs: int | None = None  # top-k logprobs of each sampled token
    prompt_logprobs: int | None = None  # top-k logprobs of the prompt positions in this chunk
    prompt_next_ids: list[int] | None = None  # the prompt token following each fed token (for prompt_logprobs)


@dataclass
class StepPlan:
    seqs: list[SeqStep]


@dataclass
class ScoreCall:
    """Teacher-forced logits of one sequence (rank 0's; every rank runs the forward), sent as a step is."""

    token_ids: list[int]


Logprobs = list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class SeqResult:
    seq_id: int
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: Logprobs | None = None
    # one entry per fed token: (logprob of the next prompt token, its top-k), None for the last prompt token
    prompt_logprobs: list[tuple[float, Logprobs] | None] | None = None


@dataclass
class StepResult:
    results: list[SeqResult] = field(default_factory=list)
    forward_s: float = 0.0  # rank 0's time in the step's forward, logits and sampling (the rest is protocol)
