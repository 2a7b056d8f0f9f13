"""Runs one step plan through the model on this rank: batch layout, forward, logits and sampling on rank 0."""

from __future__ import annotations

import torch

from shardserve.workers.device.base import AttentionMetadata
from shardserve.workers.sampler import sample, top_logprobs
from shardserve.workers.step import PENDING, SeqResult, SeqStep, StepPlan, StepResult


class ModelRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.sampled: dict[int, int] = {}  # rank 0: the token the last step sampled, by sequence (fills PENDING)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        self._fill_pending(plan.seqs)
        rows, owners = self._logit_rows(plan.seqs)
        logits = self.logits(plan.seqs, rows)
        if self.model.tp.rank != 0:
            return None
        result = self._results(plan.seqs, logits.cpu(), owners) if rows else StepResult()
        self.sampled = {r.seq_id: r.token_id for r in result.results if r.token_id is not None}
        return result

    def _fill_pending(self, seqs: list[SeqStep]) -> None:
        """PENDING inputs (the last fed token of a sequence whose previous step's result the router had not seen
        when it sent this one) become what rank 0 sampled then; rank 0 broadcasts them to the other ranks."""
        pending = [s for s in seqs if s.token_ids and s.token_ids[-1] == PENDING]
        if not pending:
            return
        tp = self.model.tp
        if tp.rank == 0:
            missing = [s.seq_id for s in pending if s.seq_id not in self.sampled]
            if missing:
                raise RuntimeError(f"step plan feeds a pending token for sequences {missing}, which the previous step "
                                   "did not sample")
            ids = [self.sampled[s.seq_id] for s in pending]
        if tp.size > 1:
            t = torch.tensor(ids if tp.rank == 0 else [0] * len(pending), device=self.device)
            ids = tp.broadcast(t).tolist()
        for s, tok in zip(pending, ids):
            s.token_ids[-1] = tok

    @torch.inference_mode()
    def logits(self, seqs: list[SeqStep], rows: list[int]) -> torch.Tensor | None:
        """The step's forward, on the model's device: fp32 logits [len(rows), vocab] of hidden rows `rows` on
        rank 0; None on the other ranks, and when no row needs logits."""
        ids, positions, meta = self._prepare(seqs)
        hidden = self.model(ids, positions, self.kv_caches, meta)  # [T, hidden]
        if not rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor | None:
        """Teacher-forced fp32 logits [T, vocab] of one sequence (rank 0), in a private scratch KV cache."""
        nblocks = -(-len(token_ids) // self.block_size)
        k0 = self.kv_caches[0][0]
        shape = (nblocks, *k0.shape[1:])
        scratch = [(k0.new_zeros(shape), k0.new_zeros(shape)) for _ in self.kv_caches]
        ids, positions, meta = self._prepare([SeqStep(0, list(token_ids), 0, list(range(nblocks)), False)])
        hidden = self.model(ids, positions, scratch, meta)
        logits = self.model.compute_logits(hidden)
        return None if logits is None else logits.cpu()

    def _prepare(self, seqs: list[SeqStep]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids, positions, slots, pad_index = [], [], [], []
        qlens = [len(s.token_ids) for s in seqs]
        max_q = max(qlens)
        for b, s in enumerate(seqs):
            ids.extend(s.token_ids)
            pos = range(s.start_pos, s.start_pos + len(s.token_ids))
            positions.extend(pos)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in pos)
            pad_index.extend(range(b * max_q, b * max_q + len(s.token_ids)))
        ctx = [s.start_pos + q for s, q in zip(seqs, qlens)]
        max_k = max(ctx)
        nblocks = -(-max_k // bs)
        tables = [s.block_table[:nblocks] + [0] * (nblocks - len(s.block_table[:nblocks])) for s in seqs]
        dev = self.device
        qlen_t, ctx_t = torch.tensor(qlens), torch.tensor(ctx)
        i = torch.arange(max_q).view(1, -1, 1)
        j = torch.arange(max_k).view(1, 1, -1)
        first = (ctx_t - qlen_t).view(-1, 1, 1)
        mask = (j <= first + i) & (j < ctx_t.view(-1, 1, 1))
        mask |= (i >= qlen_t.view(-1, 1, 1)) & (j == 0)  # padding rows see one key: no all-masked NaN rows
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor(tables, device=dev),
            query_lens=qlen_t.to(dev),
            context_lens=ctx_t.to(dev),
            pad_index=torch.tensor(pad_index, device=dev),
            attn_mask=mask.unsqueeze(1).to(dev),
            max_q=max_q,
            max_k=max_k,
            is_prefill=max_q > 1,
        )
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta

    @staticmethod
    def _logit_rows(seqs: list[SeqStep]) -> tuple[list[int], list[tuple[int, int]]]:
        """Which hidden rows need logits: every fed row for prompt_logprobs, else the last one when sampling.
        owners[b] = (first logit row of seq b, count)."""
        rows, owners, offset = [], [], 0
        for s in seqs:
            n = len(s.token_ids)
            if s.prompt_logprobs is not None:
                owners.append((len(rows), n))
                rows.extend(range(offset, offset + n))
            elif s.sample:
                owners.append((len(rows), 1))
                rows.append(offset + n - 1)
            else:
                owners.append((len(rows), 0))
            offset += n
        return rows, owners

    @staticmethod
    def _results(seqs: list[SeqStep], logits: torch.Tensor, owners: list[tuple[int, int]]) -> StepResult:
        sampling = [(b, first + count - 1) for b, (first, count) in enumerate(owners) if seqs[b].sample]
        chosen, chosen_lp, rows = sample(logits[[r for _, r in sampling]], [seqs[b] for b, _ in sampling])
        out = StepResult()
        by_seq = {b: (j, tok, lp) for j, ((b, _), tok, lp) in enumerate(zip(sampling, chosen, chosen_lp))}
        all_lp = torch.log_softmax(logits, dim=-1) if any(s.prompt_logprobs is not None for s in seqs) else None
        for b, s in enumerate(seqs):
            r = SeqResult(seq_id=s.seq_id)
            if b in by_seq:
                j, r.token_id, r.logprob = by_seq[b]
                if s.logprobs is not None:
                    r.top_logprobs = top_logprobs(rows[j], s.logprobs)
            if s.prompt_logprobs is not None:
                first, count = owners[b]
                r.prompt_logprobs = [
                    (float(all_lp[first + k, nxt]), top_logprobs(all_lp[first + k], s.prompt_logprobs))
                    if nxt is not None
                    else None
                    for k, nxt in enumerate(s.prompt_next_ids or [None] * count)
                ]
            out.results.append(r)
        return out
