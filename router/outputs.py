"""What a request returns: vLLM-shaped RequestOutput / CompletionOutput, and the streamed per-step delta."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the distribution (None if outside the returned top-k)
    decoded_token: str | None = None


PositionLogprobs = dict[int, Logprob]  # token id -> Logprob, one dict per position


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finished: bool = False
    num_cached_tokens: int = 0


@dataclass
class Delta:
    """One sequence's news from one step, streamed to the ingress."""

    request_id: str
    index: int  # which of the request's n sequences
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # on the first delta only
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # when complete
    num_cached_tokens: int = 0
    error: str | None = None
