"""Safetensors HF directories (single file or sharded index): sliced reads through safe_open's mmap."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
from safetensors import safe_open

from shardserve.workers.loader.source import CheckpointError, CheckpointSource


class SafetensorsSource(CheckpointSource):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._file_of: dict[str, str] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            files = sorted(set(_weight_map(index).values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(path, None, "no *.safetensors files found")
        self._handles = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            full = os.path.join(path, fname)
            check_header(full)
            try:
                handle = safe_open(full, framework="pt")
            except Exception as e:  # safetensors raises its own error types; name the file
                raise CheckpointError(full, None, f"cannot open safetensors file: {e}") from e
            self._handles[full] = handle
            for key in handle.keys():
                self._file_of[key] = full
                self._shapes[key] = tuple(handle.get_slice(key).get_shape())

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def file_of(self, name: str) -> str:
        return self._file_of.get(name, self.path)

    def _read(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        sl = self._handles[self._file_of[name]].get_slice(name)
        try:
            if dim is None:
                return sl[:]
            index = tuple([slice(None)] * dim + [slice(start, start + length)])
            return sl[index]
        except Exception as e:
            raise CheckpointError(self._file_of[name], name, f"unreadable tensor data: {e}") from e


# safetensors dtype names -> bytes per element (the format's spec, safetensors/src/tensor.rs Dtype)
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


def _weight_map(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(index, None, f"not a safetensors index (JSON with a weight_map): {type(e).__name__}: {e}") from None
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(os.path.dirname(index), f))})
    if missing:
        raise CheckpointError(index, None, f"weight_map names files that do not exist: {missing}")
    return weight_map


def check_header(path: str) -> None:
    """Validate a .safetensors header against the file before mapping it: 8-byte little-endian header length,
    a JSON header, and each tensor's data_offsets inside the data section and the size its dtype and shape need.
    safe_open checks some of this too, but names neither the tensor nor the bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, None, f"truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(path, None, f"truncated or corrupt: the header claims {n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, None, f"invalid header JSON ({n} bytes): {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, None, f"invalid header: a JSON {type(header).__name__}, not an object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, name, f"invalid header entry {info!r}: needs dtype, shape, data_offsets") from None
        if begin < 0 or begin > end or end > data:
            raise CheckpointError(
                path, name, f"truncated or lying header: data_offsets [{begin}, {end}) past the {data} data bytes "
                f"the file has (file {size} bytes, header {n})",
            )
        need = math.prod(shape) * _ITEMSIZE[dtype] if dtype in _ITEMSIZE else None  # sub-byte types: safe_open's
        if need is not None and end - begin != need:
            raise CheckpointError(
                path, name, f"header lies: data_offsets [{begin}, {end}) hold {end - begin} bytes, "
                f"{dtype} {list(shape)} needs {need}",
            )
