"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the (padded) vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.workers.distributed import TPGroup
from shardserve.workers.loader.source import CheckpointSource


class VocabParallelEmbedding(nn.Module):
    def __init__(self, name: str, vocab: int, hidden: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.name, self.vocab, self.hidden, self.tp, self.dtype = name, vocab, hidden, tp, dtype
        self.per_rank = -(-vocab // tp.size)  # the last rank may hold fewer real rows (zero-padded)
        self.start = tp.rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab)
        self.register_buffer("weight", None, persistent=False)  # [V/tp, hidden], a buffer so .to() moves it

    def load(self, source: CheckpointSource) -> None:
        rows = source.read(self.name, dim=0, start=self.start, length=self.end - self.start)
        if rows.shape[1] != self.hidden:
            raise ValueError(f"{source.file_of(self.name)}: {self.name} has width {rows.shape[1]}, expected {self.hidden}")
        w = torch.zeros(self.per_rank, self.hidden, dtype=self.dtype)
        w[: rows.shape[0]] = rows.to(self.dtype)
        self.weight = w

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits on rank 0: each rank computes its vocab slice, gathered and trimmed to the real vocab."""

    def __init__(self, name: str, vocab: int, hidden: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__(name, vocab, hidden, tp, dtype)
        self.tied: VocabParallelEmbedding | None = None

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Read the embedding's weight. Held as a submodule, not as a second buffer: `.to()` copies each
        module's buffers, so a shared buffer would arrive on the device twice (and no longer tied)."""
        self.weight = None
        self.tied = embedding

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        weight = self.weight if self.tied is None else self.tied.weight
        local = F.linear(hidden, weight).float()  # [S, V/tp]
        full = self.tp.gather_last_dim(local)
        return None if full is None else full[:, : self.vocab]
