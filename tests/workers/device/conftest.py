"""Device-test fixtures: the torch_npu EMULATION (tests/npu_emulation), installed only for the tests that ask for it.

The emulation is plain torch written from torch_npu's documentation; tests using it check shardserve's calls
against that reading, not Ascend hardware or its kernels (see tests/npu_emulation/torch_npu/__init__.py).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

EMULATION_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "npu_emulation")


def _forget_torch_npu() -> None:
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]


@pytest.fixture
def npu_emulation(monkeypatch):
    """Import the emulated torch_npu (which attaches the torch.npu shim); undo both afterwards."""
    had_torch_npu_attr = hasattr(torch, "npu")
    _forget_torch_npu()
    monkeypatch.syspath_prepend(EMULATION_DIR)
    module = importlib.import_module("torch_npu")
    assert module.EMULATED and module.__file__.startswith(EMULATION_DIR)
    yield module
    _forget_torch_npu()
    if not had_torch_npu_attr and hasattr(torch, "npu"):
        delattr(torch, "npu")


@pytest.fixture
def npu_emulation_dir() -> str:
    """The directory to put on a Ray worker's PYTHONPATH so that it imports the emulation."""
    return EMULATION_DIR


@pytest.fixture
def no_torch_npu(monkeypatch):
    """torch_npu not importable (None in sys.modules makes `import torch_npu` raise ModuleNotFoundError)."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)


@pytest.fixture
def npu_ops(npu_emulation):
    from shardserve.workers.device.npu import NpuOps

    return NpuOps(npu_emulation)
