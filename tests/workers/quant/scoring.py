"""Teacher-forced scoring shared by the quantized-checkpoint tests: one in-process Worker (the served model code,
TP=1), random token sequences, and the agreement measures (top-1, mean KL) every format's bounds are stated in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from shardserve.workers.device.base import TorchOps
from shardserve.workers.worker import Worker

SEQS = 3
SEQ_LEN = 64


def ids(vocab: int, seqs: int = SEQS, length: int = SEQ_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(seqs)]


def vocab(path: Path) -> int:
    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


def worker(path, device: str = "cpu", ops: TorchOps | None = None) -> Worker:
    w = Worker(str(path), device, "float32", None, 0, 1)
    if ops is not None:
        w.backend = dataclasses.replace(w.backend, ops=ops)
    w.init("127.0.0.1", 0, threads=2)
    w.init_cache(num_blocks=16, block_size=16)
    return w


def compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours))."""
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    lp_ref, lp = torch.log_softmax(ref.double(), -1), torch.log_softmax(ours.double(), -1)
    return top1, (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()


def scores(w: Worker, seqs: list[list[int]]) -> torch.Tensor:
    return torch.cat([w.score(s) for s in seqs])
