"""EMULATION of `torch.npu` (torch_npu/npu/__init__.py, memory.py, utils.py in Ascend/pytorch): device queries only.

There is no device: `current_device()` names index 0 of DEVICE_COUNT emulated NPUs and tensors stay on CPU. The
memory figures describe a small fictional card (TOTAL_MEMORY, all free), because whatever a caller sizes from them
(the KV cache under --mem-fraction-static) is allocated in host RAM. Tests set DEVICE_COUNT = 0 to emulate
"torch_npu installed, no NPU visible".
"""

from __future__ import annotations

DEVICE_COUNT = 1
TOTAL_MEMORY = 512 * 2**20  # bytes; small on purpose, see above

_state = {"device": 0, "fraction": 1.0}


def is_available() -> bool:
    return DEVICE_COUNT > 0


def device_count() -> int:
    return DEVICE_COUNT


def set_device(device) -> None:
    index = device if isinstance(device, int) else int(str(device).rpartition(":")[2] or 0)
    if not 0 <= index < DEVICE_COUNT:
        raise RuntimeError(f"emulated torch.npu.set_device({device!r}): {DEVICE_COUNT} device(s) visible")
    _state["device"] = index


def current_device() -> int:
    return _state["device"]


def set_per_process_memory_fraction(fraction: float, device=None) -> None:
    if not 0.0 < fraction <= 1.0:  # torch_npu/npu/memory.py rejects fractions outside (0, 1]
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    _state["fraction"] = fraction


def memory_fraction() -> float:
    """Emulation only: the cap last set by set_per_process_memory_fraction (no allocator enforces it)."""
    return _state["fraction"]


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) bytes of the card, as the driver reports them (not reduced by the per-process fraction);
    nothing is ever allocated on the emulated card, so all of it is free."""
    return TOTAL_MEMORY, TOTAL_MEMORY
