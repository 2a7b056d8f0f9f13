"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the (padded) vocabulary.

A format may keep the matrix group-quantized (GGUF: QuantConfig.vocab_groups): the embedding then gathers and
dequantizes only the rows it looks up (a lookup layout of the op table, exact), and the head multiplies the
quantized matrix in the op table's kernel layout. A tied head shares the embedding's values where the table can
read rows from its kernel layout (the CPU's ATen int4 nibbles, with exact scales beside the kernel's bf16 ones;
the reference, whose lookup layout is its kernel layout) and holds a second copy elsewhere (the NPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.workers.device.base import TorchOps
from shardserve.workers.device.quant_ops import GroupWeight
from shardserve.workers.distributed import TPGroup
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.quant.base import QuantConfig


class VocabParallelEmbedding(nn.Module):
    lookup = True  # the embedding gathers rows; the head (lookup False) multiplies

    def __init__(
        self,
        name: str,
        vocab: int,
        hidden: int,
        tp: TPGroup,
        dtype: torch.dtype,
        quant: QuantConfig | None = None,
        ops: TorchOps | None = None,
    ):
        super().__init__()
        self.name, self.vocab, self.hidden, self.tp, self.dtype = name, vocab, hidden, tp, dtype
        self.quant, self.ops = quant, ops or TorchOps()
        self.per_rank = -(-vocab // tp.size)  # the last rank may hold fewer real rows (zero-padded)
        self.start = tp.rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab)
        self.register_buffer("weight", None, persistent=False)  # [V/tp, hidden], a buffer so .to() moves it
        self.qweight: GroupWeight | None = None  # the group-quantized alternative, a module so .to() moves it

    def load(self, source: CheckpointSource) -> None:
        length = self.end - self.start
        groups = None if self.quant is None else self.quant.vocab_groups(source, self.name, self.start, length)
        if groups is not None:
            self._check_width(source, groups.q.shape[1])
            pad = self.per_rank - groups.q.shape[0]
            q, scale = _pad_rows(torch.from_numpy(groups.q), pad), _pad_rows(torch.from_numpy(groups.scale), pad)
            zero = None if groups.zero is None else _pad_rows(torch.from_numpy(groups.zero), pad)
            self.qweight = self.ops.pack_groups(q, scale, zero, groups.group, lookup=self.lookup)
            return
        rows = source.read(self.name, dim=0, start=self.start, length=length)
        self._check_width(source, rows.shape[1])
        w = torch.zeros(self.per_rank, self.hidden, dtype=self.dtype)
        w[: rows.shape[0]] = rows.to(self.dtype)
        self.weight = w

    def _check_width(self, source: CheckpointSource, width: int) -> None:
        if width != self.hidden:
            raise CheckpointError(source.file_of(self.name), self.name, f"has width {width}, expected {self.hidden}")

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.ops.group_rows(self.qweight, ids).to(self.dtype)
        return F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._rows(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = self._rows(local.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


def _pad_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t [R, ...] with `pad` zero rows appended (no copy without padding: a vocabulary's int8 rows are large)."""
    return t if pad == 0 else F.pad(t, (0, 0, 0, pad))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits on rank 0: each rank computes its vocab slice, gathered and trimmed to the real vocab."""

    lookup = False

    def __init__(self, name: str, vocab: int, hidden: int, tp: TPGroup, dtype: torch.dtype, quant=None, ops=None):
        super().__init__(name, vocab, hidden, tp, dtype, quant, ops)
        self.tied: VocabParallelEmbedding | None = None

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Read the embedding's weight. Held as a submodule, not as a second buffer: `.to()` copies each
        module's buffers, so a shared buffer would arrive on the device twice (and no longer tied).
        A quantized embedding's weight is made multipliable by the op table (tie_groups): one copy, which the
        head reads through `tied`, where the table's group_matmul reads its lookup layout, else a second copy."""
        self.weight = None
        self.tied = embedding
        if embedding.qweight is not None:
            packed = self.ops.tie_groups(embedding.qweight)
            self.qweight = None if packed is embedding.qweight else packed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        qweight = self.qweight if self.qweight is not None else getattr(self.tied, "qweight", None)
        if qweight is not None:
            local = self.ops.group_matmul(hidden, qweight).float()  # [S, V/tp]
        else:
            weight = self.weight if self.tied is None else self.tied.weight
            local = F.linear(hidden, weight).float()  # [S, V/tp]
        full = self.tp.gather_last_dim(local)
        return None if full is None else full[:, : self.vocab]
