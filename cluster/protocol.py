"""OpenAI request bodies (pydantic) and their mapping onto SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from shardserve.router.sampling_params import RequestError, SamplingParams

# Prompts per completion request: each one is a router request of n sequences, all submitted at once.
MAX_PROMPTS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None)
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

    def sampling(self, logprobs: int | None, max_tokens: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
            prompts = [p]
        elif isinstance(p, list) and p:
            prompts = list(p)
        else:
            raise RequestError("prompt must be a non-empty string, list of strings, or token ids", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
        if self.echo and not all(isinstance(x, str) for x in prompts):
            # the ingress holds no tokenizer to turn the ids back into the text to echo
            raise RequestError("echo needs text prompts; token-id prompts cannot be echoed", param="echo")
        return prompts

    def params(self) -> SamplingParams:
        return self.sampling(self.logprobs, self.max_tokens, self.prompt_logprobs)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def params(self) -> SamplingParams:
        if not self.messages:
            raise RequestError("messages must hold at least one message", param="messages")
        for i, m in enumerate(self.messages):
            # tool calls, which let an assistant message go without content, are not accepted here
            if m.content is None:
                param = f"messages[{i}].content"
                raise RequestError(f"{param} is missing (a {m.role} message needs content)", param=param)
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling(lp, self.max_completion_tokens or self.max_tokens)

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]
