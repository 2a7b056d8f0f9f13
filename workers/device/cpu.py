"""The CPU backend: plain torch ops, gloo collectives."""

from shardserve.workers.device.base import DeviceBackend, TorchOps


def backend() -> DeviceBackend:
    return DeviceBackend(name="cpu", dist_backend="gloo", ray_resource="CPU", ops=TorchOps())


def available() -> bool:
    return True
