"""The tensor-parallel group a layer talks through: rank, size and the collectives (gloo | nccl | hccl)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate each rank's [.., n] along the last dim on rank 0 (None on the others)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None


def init_tp_group(
    backend: str, rank: int, size: int, master_addr: str, master_port: int, timeout_s: float = 300.0
) -> TPGroup:
    if size > 1:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=timeout_s),
        )
    return TPGroup(rank=rank, size=size)


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tp_size={d}; choose a tp_size that divides it")
    return n // d
