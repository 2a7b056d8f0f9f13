"""SamplingParams: vLLM's field names, validated at the door so a bad request fails with the field's name."""

from __future__ import annotations

from dataclasses import dataclass, field

# Samples per request: OpenAI's documented bound on `n`. Each sample is a sequence in the batch; an unbounded n
# lets one request take every slot.
MAX_N = 128
# Stop strings per request and characters per stop string: each is searched for in every step's new text.
MAX_STOP, MAX_STOP_CHARS = 16, 256
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs
INT64 = 2**63


class RequestError(ValueError):
    """A request that cannot be served as asked; `param` names the offending field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt position
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        seed_ok = self.seed is None or -INT64 <= self.seed < INT64
        checks = [
            (1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1 or 0 (off), or >= 1"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"must be in [0, {MAX_LOGPROBS}]",
            ),
            (seed_ok, "seed", "must fit in a signed 64-bit integer"),
            (len(self.stop) <= MAX_STOP, "stop", f"must hold at most {MAX_STOP} strings"),
            (all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop", f"strings must be at most {MAX_STOP_CHARS} characters"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids (>= 0)"),
        ]
        for ok, name, rule in checks:
            if not ok:
                got = repr(getattr(self, name))
                got = got if len(got) <= 80 else got[:77] + "..."
                raise RequestError(f"{name} {rule}, got {got}", param=name)
        if self.top_k == 0:
            self.top_k = -1

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1
