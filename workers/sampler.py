"""Sampling on rank 0: greedy, temperature, top-k, top-p, min-p, per-request seeds, top-k logprobs."""

from __future__ import annotations

import torch

from shardserve.workers.step import Logprobs, SeqStep

_GREEDY_EPS = 1e-5


def sample(logits: torch.Tensor, seqs: list[SeqStep]) -> tuple[list[int], list[float], torch.Tensor | None]:
    """logits fp32 [S, V] (on any device) -> the chosen ids, each one's logprob under the raw log-softmax, and that
    log-softmax [S, V] where some sequence asked for top logprobs (else None: a full-vocabulary pass less a step).

    Sampled rows draw by the Gumbel-max trick: argmax of log p + G, G = -log(-log U) per token, U uniform (exactly
    a multinomial draw from p). Rows whose only setting is the temperature (top-k, top-p and min-p off: OpenAI's
    defaults) take log p = logits / T (a constant off, which the argmax ignores): no softmax, and not the filter's
    sort of the vocabulary (at 16 sequences and 49k tokens that sort, and torch's exponential_ noise, were ~2x a
    step's forward)."""
    chosen = logits.argmax(dim=-1)
    V = logits.shape[-1]
    rows = [i for i, s in enumerate(seqs) if s.temperature > _GREEDY_EPS and s.top_k != 1]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sampled = [seqs[i] for i in rows]
        filtered = [j for j, s in enumerate(sampled) if 0 < s.top_k < V or s.top_p < 1 or s.min_p > 0]
        temp = torch.tensor([s.temperature for s in sampled], device=logits.device).unsqueeze(1)
        scores = logits[idx] / temp  # [R, V]
        if filtered:
            pick = torch.tensor(filtered, device=logits.device)
            scores[pick] = _filtered_probs(logits[idx[pick]], [sampled[j] for j in filtered]).log()  # dropped: -inf
        noise = torch.empty_like(scores).uniform_()
        for j, s in enumerate(sampled):
            if s.seed is not None:
                # a pure function of (seed, step): the same choice after a preemption and recompute
                seed = (s.seed * 1_000_003 + s.num_generated) % 2**63
                noise[j].uniform_(generator=torch.Generator(noise.device).manual_seed(seed))
        # U = 0 gives G = -inf: that token is not drawn (probability 2^-24 a token)
        chosen[idx] = (scores - noise.log_().neg_().log_()).argmax(dim=-1)
    chosen_lp = logits.gather(1, chosen.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    full = torch.log_softmax(logits, dim=-1) if any(s.logprobs is not None for s in seqs) else None
    return chosen.tolist(), chosen_lp.tolist(), full


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
