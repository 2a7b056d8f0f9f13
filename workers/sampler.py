"""Sampling on rank 0: greedy, temperature, top-k, top-p, min-p, per-request seeds, top-k logprobs."""

from __future__ import annotations

import torch

from shardserve.workers.step import Logprobs, SeqStep

_GREEDY_EPS = 1e-5


def sample(logits: torch.Tensor, seqs: list[SeqStep]) -> tuple[list[int], torch.Tensor]:
    """logits fp32 [S, V] (on any device) -> chosen ids and the raw log-softmax [S, V] (for logprobs)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if s.temperature > _GREEDY_EPS and s.top_k != 1]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [seqs[i] for i in rows])  # [R, V]
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            gen = None
            if seqs[i].seed is not None:
                # a pure function of (seed, step): the same choice after a preemption and recompute
                seed = (seqs[i].seed * 1_000_003 + seqs[i].num_generated) % 2**63
                gen = torch.Generator(noise.device).manual_seed(seed)
            noise[j].exponential_(generator=gen)
        chosen[idx] = (probs / noise).argmax(dim=-1)  # Gumbel-max form of multinomial sampling
    return chosen.tolist(), logprobs


def _filtered_probs(logits: torch.Tensor, seqs: list[SeqStep]) -> torch.Tensor:
    dev = logits.device
    temp = torch.tensor([s.temperature for s in seqs], device=dev).unsqueeze(1)
    logits = logits / temp
    V = logits.shape[-1]
    top_k = torch.tensor([s.top_k if 0 < s.top_k < V else V for s in seqs], device=dev)
    top_p = torch.tensor([s.top_p for s in seqs], device=dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(V, device=dev).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # top-p keeps the smallest prefix whose mass reaches p (the first token always stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    min_p = torch.tensor([s.min_p for s in seqs], device=dev).unsqueeze(1)
    drop |= probs < min_p * probs[:, :1]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    return torch.empty_like(probs).scatter_(1, order, probs)


def top_logprobs(row: torch.Tensor, k: int) -> Logprobs:
    """The k best (id, logprob) of a log-softmax row."""
    if k <= 0:
        return []
    vals, ids = row.topk(min(k, row.shape[-1]))
    return list(zip(ids.tolist(), vals.tolist()))
