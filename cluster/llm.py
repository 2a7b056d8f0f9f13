"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, vLLM-shaped, through the router actor."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import ray

from shardserve.cluster.config import EngineConfig
from shardserve.cluster.launch import start_router
from shardserve.router.outputs import CompletionOutput, Delta, RequestOutput
from shardserve.router.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput"]


class LLM:
    def __init__(self, model: str = "", tp_size: int = 1, dp_size: int = 1, device: str = "auto", dtype: str = "auto",
                 quantization: str | None = None, **kwargs: Any):
        self.config = EngineConfig(model_path=model, tp_size=tp_size, dp_size=dp_size, device=device, dtype=dtype,
                                   quantization=quantization, **kwargs)
        self.router, self.info = start_router(self.config)
        self._counter = itertools.count()

    def generate(
        self,
        prompts: str | list[str] | list[dict] | dict,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Strings or {"prompt_token_ids": [...]}; all submitted at once, so they batch continuously."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        refs, texts = [], []
        for prompt, p in zip(prompts, params):
            value = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
            texts.append(prompt if isinstance(prompt, str) else None)
            refs.append(self.router.complete.remote(self._request_id(), p, prompt=value))
        return [_assemble(deltas, text) for deltas, text in zip(ray.get(refs), texts)]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = sampling_params or SamplingParams()
        refs = [self.router.complete.remote(self._request_id(), params, messages=conv) for conv in conversations]
        return [_assemble(deltas, None) for deltas in ray.get(refs)]

    def score(self, token_ids: list[int]):
        """Teacher-forced fp32 logits [len(token_ids), vocab] (a torch tensor)."""
        return ray.get(self.router.score.remote(list(token_ids)))

    def stats(self) -> dict:
        return ray.get(self.router.stats.remote())

    def shutdown(self) -> None:
        ray.get(self.router.shutdown.remote())
        ray.kill(self.router)

    def _request_id(self) -> str:
        return f"llm-{next(self._counter)}-{uuid.uuid4().hex[:8]}"


def _assemble(deltas: list[Delta], prompt: str | None) -> RequestOutput:
    """Fold a request's streamed deltas into one RequestOutput."""
    first = deltas[0]
    out = RequestOutput(first.request_id, prompt, [], [], finished=True)
    by_index: dict[int, CompletionOutput] = {}
    for d in deltas:
        if d.prompt_token_ids is not None and not out.prompt_token_ids:
            out.prompt_token_ids, out.prompt_logprobs = d.prompt_token_ids, d.prompt_logprobs
            out.num_cached_tokens = d.num_cached_tokens
        c = by_index.setdefault(d.index, CompletionOutput(d.index))
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.logprobs
        if d.finish_reason is not None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        if d.error:
            raise RuntimeError(f"request {d.request_id} failed: {d.error}")
    out.outputs = [by_index[i] for i in sorted(by_index)]
    for c in out.outputs:
        if c.logprobs is not None:
            c.cumulative_logprob = sum(pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids))
    return out
