"""Quant-test fixtures: the torch_npu emulation the device tests use (tests/workers/device/conftest.py)."""

from tests.workers.device.conftest import npu_emulation  # noqa: F401  (a fixture, registered by import)
