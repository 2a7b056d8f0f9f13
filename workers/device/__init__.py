"""Device backends: one file per device; `get_backend("auto")` picks npu, then cuda, then cpu."""

from __future__ import annotations

import importlib

from shardserve.workers.device.base import AttentionMetadata, DeviceBackend, TorchOps

DEVICES = ("npu", "cuda", "cpu")
# the Ray resource that places a worker of each device: what the router needs to know of a device, without
# importing its stack (torch_npu is absent from a CPU head node)
RAY_RESOURCES = {"npu": "NPU", "cuda": "GPU", "cpu": "CPU"}

__all__ = ["RAY_RESOURCES", "AttentionMetadata", "DeviceBackend", "TorchOps", "get_backend", "resolve_device"]


def _module(name: str):
    return importlib.import_module(f"shardserve.workers.device.{name}")


def resolve_device(name: str) -> str:
    """'auto' -> the first device present (npu when torch_npu sees one, else cuda, else cpu)."""
    if name != "auto":
        if name not in DEVICES:
            raise ValueError(f"unknown device {name!r}; choose from auto, {', '.join(DEVICES)}")
        return name
    for dev in DEVICES:
        try:
            if _module(dev).available():
                return dev
        except ModuleNotFoundError:
            continue
    return "cpu"


def get_backend(name: str) -> DeviceBackend:
    return _module(resolve_device(name)).backend()
