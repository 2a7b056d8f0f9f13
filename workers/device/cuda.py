"""The CUDA backend: torch ops on the GPU (SDPA picks flash/mem-efficient kernels), NCCL collectives."""

from __future__ import annotations

import torch

from shardserve.workers.device.base import DeviceBackend, TorchOps


class CudaBackend(DeviceBackend):
    def setup(self, local_index: int) -> torch.device:
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so it is always cuda:0 inside the worker
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def memory_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info()


def backend() -> DeviceBackend:
    return CudaBackend(name="cuda", dist_backend="nccl", ray_resource="GPU", ops=TorchOps())


def available() -> bool:
    return torch.cuda.is_available()
