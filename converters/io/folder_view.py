"""A read-only view of a safetensors folder in which some tensors read as derived ones (decoded from a quantized
format, fused, sliced): the base of the quantized-format readers (converters/io/quantized.py) and of the fusions
view (converters/convert/hf_source.py). Subclasses fill `tensors` (what the view holds) and override `read` for
the tensors they derive; the others read from the folder underneath."""

from __future__ import annotations

import numpy as np

from converters.io.safetensors import TensorInfo


class FolderView:
    def __init__(self, folder, tensors: dict[str, TensorInfo] | None = None):
        self.inner = folder
        self.folder = folder.folder
        self.tensors: dict[str, TensorInfo] = {} if tensors is None else tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name in self.tensors:
            return self.tensors[name]
        return self.inner.info(name)  # raises the folder's missing-tensor error

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self.inner.read(name, rows)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
