"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, vLLM-shaped, through the router actor."""

from __future__ import annotations

import itertools
import logging
import uuid
import weakref
from typing import Any

import ray

from shardserve.cluster.config import EngineConfig
from shardserve.cluster.launch import start_router
from shardserve.router.outputs import CompletionOutput, Delta, RequestOutput
from shardserve.router.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput"]

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 60.0


class LLM:
    """An engine in this process's Ray: its router, workers and placement groups live until `shutdown()` (or
    `close()`, the end of a `with` block, or garbage collection), so a second `LLM` finds the resources free."""

    def __init__(self, model: str = "", tp_size: int = 1, dp_size: int = 1, device: str = "auto", dtype: str = "auto",
                 quantization: str | None = None, **kwargs: Any):
        self.config = EngineConfig(model_path=model, tp_size=tp_size, dp_size=dp_size, device=device, dtype=dtype,
                                   quantization=quantization, **kwargs)
        self.router, self.info = start_router(self.config)
        self._counter = itertools.count()
        # runs once: at shutdown(), when this object is collected, or at interpreter exit (holds no ref to self)
        self._release = weakref.finalize(self, _release, self.router)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

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
        """Fail what is in flight, release the workers and placement groups, stop the router; idempotent."""
        self._release()

    close = shutdown

    def _request_id(self) -> str:
        return f"llm-{next(self._counter)}-{uuid.uuid4().hex[:8]}"


def _release(router) -> None:
    if not ray.is_initialized():  # at interpreter exit Ray may be gone already, and our resources with it
        return
    try:
        ray.get(router.shutdown.remote(), timeout=SHUTDOWN_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as e:  # a dead router: killing it below is all that is left
        logger.warning("router shutdown did not complete (%s); killing it", e)
    ray.kill(router)


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
