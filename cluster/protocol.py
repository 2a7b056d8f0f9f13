"""OpenAI request bodies (pydantic) and their mapping onto SamplingParams.

Fields are strict (no "5" for 5, no 5.0 for an int, no "true" for a bool), as OpenAI's own API is: a wrong type is a
400 naming the field, not a guess. Ranges live in SamplingParams, so the offline LLM checks them too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from shardserve.router.sampling_params import RequestError, SamplingParams

# Prompts per completion request: each one is a router request of n sequences, all submitted at once.
MAX_PROMPTS = 256
# Chat messages per request: far above any real conversation that fits a context.
MAX_MESSAGES = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    # accepted so that a client sending OpenAI's defaults works; anything else is refused, not silently ignored
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def _unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not -2.0 <= v <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {v!r}", param=name)
            if v:
                raise RequestError(f"{name} is not supported by this server; send 0 or leave it out", param=name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server; leave it out", param="logit_bias")

    def sampling(self, logprobs: int | None, max_tokens: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        self._unsupported()
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, p: Any) -> Any:
        # one clear message instead of one per member of the union
        ok = isinstance(p, str) or _is_ids(p) or (isinstance(p, list) and (all(isinstance(x, str) for x in p) or all(_is_ids(x) for x in p)))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")
        return p

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            prompts = [p]
        elif p:
            prompts = list(p)
        else:
            raise RequestError("prompt must be a non-empty string, list of strings, or token ids", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
        for i, x in enumerate(prompts):
            if not x:
                param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise RequestError(f"{param} is empty", param=param)
        if self.echo and not all(isinstance(x, str) for x in prompts):
            # the ingress holds no tokenizer to turn the ids back into the text to echo
            raise RequestError("echo needs text prompts; token-id prompts cannot be echoed", param="echo")
        return prompts

    def params(self) -> SamplingParams:
        return self.sampling(self.logprobs, self.max_tokens, self.prompt_logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, c: Any) -> Any:
        if c is None or isinstance(c, str):
            return c
        if not isinstance(c, list):
            raise ValueError("must be a string or a list of content parts")
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"part [{j}] is of type {kind!r}; only 'text' parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part [{j}] needs a string 'text'")
        return c


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def params(self) -> SamplingParams:
        if not self.messages:
            raise RequestError("messages must hold at least one message", param="messages")
        if len(self.messages) > MAX_MESSAGES:
            raise RequestError(f"messages holds {len(self.messages)} messages; at most {MAX_MESSAGES}", param="messages")
        for i, m in enumerate(self.messages):
            # tool calls, which let an assistant message go without content, are not accepted here
            if m.content is None:
                param = f"messages[{i}].content"
                raise RequestError(f"{param} is missing (a {m.role} message needs content)", param=param)
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise RequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}", param="top_logprobs")
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        try:
            return self.sampling(lp, self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens)
        except RequestError as e:
            if e.param == "max_tokens" and name != "max_tokens":
                e.param = name
            raise

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]
