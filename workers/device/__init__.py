"""Device backends: one file per device; `get_backend("auto")` picks npu, then cuda, then cpu."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardserve.workers.device.base import DeviceBackend

DEVICES = ("npu", "cuda", "cpu")
# the Ray resource that places a worker of each device: what the router needs to know of a device, without
# importing its stack (torch_npu is absent from a CPU head node)
RAY_RESOURCES = {"npu": "NPU", "cuda": "GPU", "cpu": "CPU"}

__all__ = ["RAY_RESOURCES", "AttentionMetadata", "DeviceBackend", "TorchOps", "get_backend", "resolve_device"]


def __getattr__(name: str):
    """The op table's types, imported (with torch) on first use: RAY_RESOURCES alone needs no torch (the router)."""
    if name in ("AttentionMetadata", "DeviceBackend", "TorchOps"):
        from shardserve.workers.device import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
