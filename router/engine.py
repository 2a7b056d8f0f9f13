"""The engine core of one replica: requests in, step plans out, step results back into streamed deltas.

Synchronous and Ray-free: the router actor drives it; tests can drive it with a worker in-process.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from shardserve.router.block_manager import BlockManager
from shardserve.router.detokenizer import IncrementalDetokenizer
from shardserve.router.outputs import Delta, Logprob, PositionLogprobs
from shardserve.router.sampling_params import RequestError, SamplingParams
from shardserve.router.scheduler import Scheduler
from shardserve.router.sequence import Sequence, Status
from shardserve.workers.step import Logprobs, SeqResult, SeqStep, StepPlan, StepResult


class EngineCore:
    def __init__(self, tokenizer, num_blocks: int, block_size: int, max_model_len: int, vocab_size: int, cfg):
        self.tokenizer = tokenizer
        self.blocks = BlockManager(num_blocks, block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        # per step sent and not yet processed, oldest first: (sequence, computed after it, epoch, samples)
        self._inflight: deque[list[tuple[Sequence, int, int, bool]]] = deque()
        # step_seconds: each step from the previous step's result (or its own send, none being in flight) to its own
        # (router/router.py _run); forward_seconds: of which rank 0 ran the model
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "steps": 0,
                      "step_seconds": 0.0, "forward_seconds": 0.0}

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in flight", param="request_id")
        self._validate(prompt_ids, params)
        max_len = self.max_model_len
        if params.max_tokens is not None:
            max_len = min(max_len, len(prompt_ids) + params.max_tokens)
        if -(-max_len // self.blocks.block_size) > len(self.blocks.blocks):
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens needs {max_len} tokens of KV cache, more "
                f"than the whole cache holds ({len(self.blocks.blocks) * self.blocks.block_size}); lower max_tokens",
                param="max_tokens",
            )
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            seqs.append(Sequence(next(self._ids), request_id, i, list(prompt_ids), params, max_len, detok, now))
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(prompt_ids)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} "
                "(prompt plus at least one generated token)",
                param="prompt",
            )
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            # refused as vLLM does (serving_engine.py), not clamped: a client asking for more than fits would
            # otherwise wait for a generation it did not ask for; max_tokens=None means "up to the context"
            p, m = len(prompt_ids), params.max_tokens
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{p + m} tokens ({p} in the prompt, {m} in the completion). Please reduce the length of the "
                "prompt or max_tokens.",
                param="max_tokens",
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}", param="prompt")

    def abort(self, request_id: str) -> list[Delta]:
        deltas = []
        for seq in self.requests.pop(request_id, []):
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                deltas.append(Delta(request_id, seq.index, "", [], finish_reason="abort"))
        return deltas

    def take_requests(self) -> dict[str, list[Sequence]]:
        """Hand over every request in flight (its replica failed): this core forgets them and frees their blocks."""
        taken, self.requests = self.requests, {}
        self._inflight.clear()
        for seqs in taken.values():
            for seq in seqs:
                seq.num_pending = 0  # the steps in flight will not return
                if seq.finish_reason is None:
                    self.scheduler.finish(seq)
                    seq.status = Status.WAITING
        return taken

    def adopt(self, request_id: str, seqs: list[Sequence]) -> None:
        """Take over a request from a failed replica: its unfinished sequences are recomputed from their prompt
        and the tokens already streamed (as after a preemption), so a client sees no gap and no repeat."""
        for seq in seqs:
            if seq.finish_reason is None:
                seq.seq_id = next(self._ids)  # ids are per core
                seq.preempt()
                self.scheduler.add(seq)
        self.requests[request_id] = seqs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- steps -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None. It may be called again before the last plan's result is processed (the
        router sends step N+1 while step N runs): each sequence counts what the steps sent will compute and
        sample, and a token sampled by a step still in flight is fed as PENDING, which the worker fills in."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return None
        self.stats["steps"] += 1
        steps, record = [], []
        for seq, n in scheduled:
            step = self._seq_step(seq, n)
            seq.num_computed += n
            seq.num_pending += step.sample
            steps.append(step)
            record.append((seq, seq.num_computed, seq.epoch, step.sample))
        self._inflight.append(record)
        return StepPlan(steps)

    @property
    def steps_in_flight(self) -> int:
        return len(self._inflight)

    def _seq_step(self, seq: Sequence, n: int) -> SeqStep:
        start, p = seq.num_computed, seq.params
        tokens = seq.tokens
        step = SeqStep(
            seq_id=seq.seq_id,
            token_ids=tokens[start : start + n],
            start_pos=start,
            block_table=list(seq.blocks.table),
            sample=start + n == len(tokens),
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            seed=None if p.seed is None else p.seed + seq.index,
            num_generated=len(seq.output_ids) + seq.num_pending,  # the tokens before the one this step samples
            logprobs=p.logprobs,
        )
        if seq.wants_prompt_logprobs and start < len(seq.prompt_ids):
            step.prompt_logprobs = p.prompt_logprobs
            step.prompt_next_ids = [tokens[i + 1] if i + 1 < len(seq.prompt_ids) else None for i in range(start, start + n)]
        return step

    def process(self, result: StepResult) -> list[Delta]:
        """Fold rank 0's results of the oldest step in flight into its sequences; returns the deltas to stream."""
        by_id = {r.seq_id: r for r in result.results}
        deltas = []
        for seq, computed, epoch, sampled in self._inflight.popleft():
            if seq.finish_reason is not None:  # finished or aborted while the step ran: nothing of it is kept
                continue
            r = by_id.get(seq.seq_id)
            if sampled and (r is None or r.token_id is None):
                raise RuntimeError(f"step result without the token sampled for sequence {seq.seq_id}")
            if epoch == seq.epoch:  # else preempted since: its KV is gone, its sampled token stays (the output's)
                self.blocks.commit(seq.blocks, seq.tokens, computed)  # every token up to `computed` is known by now
                if r is not None and r.prompt_logprobs is not None:
                    self._add_prompt_logprobs(seq, r, computed)
            if sampled:
                seq.num_pending -= 1
                deltas.append(self._append_token(seq, r))
        return deltas

    def _add_prompt_logprobs(self, seq: Sequence, r: SeqResult, computed: int) -> None:
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first prompt token has no context
        start = computed - len(r.prompt_logprobs)
        for k, entry in enumerate(r.prompt_logprobs):
            if entry is not None and len(seq.prompt_logprobs) < len(seq.prompt_ids):
                nxt = seq.prompt_ids[start + k + 1]
                seq.prompt_logprobs.append(self._position_logprobs(nxt, entry[0], entry[1]))

    def _position_logprobs(self, token: int, logprob: float, top: Logprobs) -> PositionLogprobs:
        out: PositionLogprobs = {}
        for rank, (tid, lp) in enumerate(top, start=1):
            out[tid] = Logprob(lp, rank, self.tokenizer.decode([tid], skip_special_tokens=False))
        if token not in out:
            out[token] = Logprob(logprob, None, self.tokenizer.decode([token], skip_special_tokens=False))
        return out

    def _append_token(self, seq: Sequence, r: SeqResult) -> Delta:
        tok = r.token_id
        seq.output_ids.append(tok)
        seq.cumulative_logprob += r.logprob or 0.0
        self.stats["generation_tokens"] += 1
        lp = None
        if seq.params.logprobs is not None:
            lp = self._position_logprobs(tok, r.logprob, r.top_logprobs or [])
            seq.logprobs.append(lp)
        seq.detokenizer.add([tok])
        self._check_stop(seq, tok)
        return self._delta(seq, [tok], lp)

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            if not p.ignore_eos and tok in self.tokenizer.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", (None if tok == self.tokenizer.eos_token_id else tok)
            elif tok in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
            elif p.stop and self._stop_string(seq):
                seq.finish_reason = "stop"
        if seq.finish_reason is None and seq.num_known >= seq.max_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _stop_string(self, seq: Sequence) -> bool:
        text = seq.detokenizer.text
        longest = max(len(s) for s in seq.params.stop)
        window_start = max(0, seq.emitted_text - longest)
        for s in seq.params.stop:
            at = text.find(s, window_start)
            if at >= 0:
                seq.stop_reason = s
                seq.final_text = text[: at + len(s)] if seq.params.include_stop_str_in_output else text[:at]
                return True
        return False

    def _delta(self, seq: Sequence, toks: list[int], lp) -> Delta:
        text = seq.final_text
        if text is None:
            if seq.finish_reason is not None:
                seq.detokenizer.finish()  # flush a held-back incomplete character
            text = seq.detokenizer.text
            if seq.finish_reason is None and seq.params.stop:
                # hold back what could still become a stop string
                text = text[: max(seq.emitted_text, len(text) - max(len(s) for s in seq.params.stop) + 1)]
        new = text[seq.emitted_text :]
        seq.emitted_text = len(text)
        d = Delta(seq.request_id, seq.index, new, toks, [lp] if lp is not None else None, seq.finish_reason, seq.stop_reason)
        if not seq.sent_prompt:
            seq.sent_prompt = True
            d.prompt_token_ids, d.num_cached_tokens = seq.prompt_ids, seq.num_cached_tokens
            d.prompt_logprobs = seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None
        if seq.finish_reason is not None:
            self._retire(seq)
        return d

    def _retire(self, seq: Sequence) -> None:
        seqs = self.requests.get(seq.request_id, [])
        if all(s.finish_reason is not None for s in seqs):
            self.requests.pop(seq.request_id, None)
            self.stats["requests_finished"] += 1
