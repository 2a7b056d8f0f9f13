"""Safetensors HF directories (single file or sharded index): sliced reads through safe_open's mmap."""

from __future__ import annotations

import json
import os

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
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(path, None, "no *.safetensors files found")
        self._handles = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            full = os.path.join(path, fname)
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
