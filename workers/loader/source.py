"""The checkpoint-source contract: lazy, sliceable access to a checkpoint's tensors by HF name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the reads, not by opening a checkpoint (the driver reads only its config)
    import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file, the tensor, what was expected and found."""

    def __init__(self, file: str, tensor: str | None, message: str):
        where = f"{file}: tensor {tensor!r}" if tensor else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.tensor = tensor
        self.detail = message

    def __reduce__(self):  # crosses Ray (worker -> router -> driver) as itself, not as an unpicklable error
        return type(self), (self.file, self.tensor, self.detail)


class CheckpointSource(ABC):
    """Tensors by their HF name (model.layers.0.self_attn.q_proj.weight), read one rank's slice at a time.

    A slice is (dim, start, length) along one axis of the tensor in torch order; a source reads only
    those bytes from disk (safetensors mmap slices, GGUF packed blocks).
    """

    path: str

    def __init__(self) -> None:
        self.consumed: set[str] = set()

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def file_of(self, name: str) -> str: ...

    @abstractmethod
    def _read(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor: ...

    def has(self, name: str) -> bool:
        return name in self._name_set()

    def _name_set(self) -> set[str]:
        if not hasattr(self, "_names_cache"):
            self._names_cache = set(self.names())
        return self._names_cache

    def read(
        self,
        name: str,
        dim: int | None = None,
        start: int = 0,
        length: int | None = None,
        expect_shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Read `name`, or only [start, start+length) along `dim`; checks the full shape if given."""
        if not self.has(name):
            raise CheckpointError(self.path, name, "missing from the checkpoint")
        shape = self.shape(name)
        if expect_shape is not None and tuple(shape) != tuple(expect_shape):
            raise CheckpointError(
                self.file_of(name), name, f"expected shape {tuple(expect_shape)}, found {tuple(shape)}"
            )
        if dim is not None:
            length = shape[dim] - start if length is None else length
            if start < 0 or start + length > shape[dim]:
                raise CheckpointError(
                    self.file_of(name), name, f"slice [{start}, {start + length}) of dim {dim} out of {shape}"
                )
        self.consumed.add(name)
        return self._read(name, dim, start, length or 0)

    def unconsumed(self) -> list[str]:
        return sorted(set(self.names()) - self.consumed)
