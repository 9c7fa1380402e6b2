"""Small invertible tensor transforms: each knows its forward (HF -> MaxText) and inverse (MaxText -> HF).

A mapping rule lists a chain of these; the chain runs left to right on import and right to left (each
inverted) on export, so a family declares a transform once for both directions. Transforms act on one
layer's tensor (the unscanned shape); the engine stacks or slices layers around them.

`exact` tells whether the transform only moves elements (transpose, reshape, permutation): those run in
the source dtype. Value-changing ones (scaling, offsets) make the engine compute in float32 and cast once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from converters.io import buffers

_TILE = 256
_TORCH_MIN_BYTES = 16 << 20  # below this, importing torch is not worth it (docs/performance.md, "Speed")
_torch = None


def _torch_module():
    """torch (a dependency anyway), imported on first use; None when it is not installed."""
    global _torch
    if _torch is None:
        try:
            import torch

            _torch = torch
        except ImportError:
            _torch = False
    return _torch or None


def transpose2d(x: np.ndarray) -> np.ndarray:
    """Contiguous transpose of a 2-D array: torch's transpose kernel for large ones (faster than the tiled numpy
    copy below, itself faster than numpy's plain strided copy: docs/performance.md, "Speed"). Bits are moved as
    integers."""
    r, c = x.shape
    ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}.get(x.dtype.itemsize)
    if x.nbytes >= _TORCH_MIN_BYTES and ints is not None and x.flags.c_contiguous and x.flags.writeable:
        torch = _torch_module()
        if torch is not None:
            y = buffers.empty((c, r), x.dtype)  # reused memory: no fresh pages to fault in and zero
            torch.from_numpy(y.view(ints)).copy_(torch.from_numpy(x.view(ints)).t())
            return y
    if r * c < _TILE * _TILE:
        return np.ascontiguousarray(x.T)
    if x.dtype.itemsize in (1, 2, 4, 8) and x.dtype.kind not in "biuf":
        # ml_dtypes (bfloat16, float8) copy through a slow generic path; move the bits as plain integers
        ints = np.dtype(f"u{x.dtype.itemsize}")
        return transpose2d(x.view(ints)).view(x.dtype)
    y = buffers.empty((c, r), x.dtype)
    for i in range(0, r, _TILE):
        for j in range(0, c, _TILE):
            y[j : j + _TILE, i : i + _TILE] = x[i : i + _TILE, j : j + _TILE].T
    return y


class Transform:
    exact = True

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@dataclass(repr=False)
class Kernel(Transform):
    """torch Linear weight `[out, in]` <-> MaxText kernel `[*in_dims, *out_dims]` (transpose, then reshape).

    `mt_shape` is the MaxText per-layer shape and `n_in` how many of its leading axes make up `in`
    (query `[E, N, D]`: n_in=1; attention out `[N, D, E]`: n_in=2).
    """

    mt_shape: tuple[int, ...]
    n_in: int = 1

    def forward(self, x):
        # contiguous (tiled transpose): the writer hashes the bytes and lets tensorstore keep them without a copy
        return transpose2d(x).reshape(self.mt_shape)

    def inverse(self, y):
        n_in = math.prod(self.mt_shape[: self.n_in])
        return transpose2d(y.reshape(n_in, -1))


@dataclass(repr=False)
class Reshape(Transform):
    """Plain C-order reshape, e.g. a q/k/v bias `[N*D]` <-> `[N, D]`."""

    mt_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]

    def forward(self, x):
        return x.reshape(self.mt_shape)

    def inverse(self, y):
        return y.reshape(self.hf_shape)


@dataclass(repr=False)
class Permute(Transform):
    """Axis permutation (e.g. a conv kernel `[O, I, H, W]` <-> `[H, W, I, O]`)."""

    axes: tuple[int, ...]

    def forward(self, x):
        # 2-D (lm_head): a contiguous tiled transpose, as the writer needs the bytes (a strided bf16 copy is slow)
        return transpose2d(x) if self.axes == (1, 0) else x.transpose(self.axes)

    def inverse(self, y):
        return transpose2d(y) if self.axes == (1, 0) else y.transpose(np.argsort(self.axes))


class RopeInterleave(Transform):
    """HF rotates the two halves of head_dim; MaxText's Llama rotates adjacent pairs.

    Forward puts element k of the first half at 2k and element k of the second half at 2k+1 along the
    last axis (head_dim); the inverse gathers even then odd positions.
    """

    def forward(self, x):
        half = x.shape[-1] // 2
        out = np.empty_like(x)
        out[..., 0::2] = x[..., :half]
        out[..., 1::2] = x[..., half:]
        return out

    def inverse(self, y):
        return np.concatenate([y[..., 0::2], y[..., 1::2]], axis=-1)


@dataclass(repr=False)
class Scale(Transform):
    """Multiply by a constant (e.g. MaxText bakes 1/sqrt(head_dim) into Llama's query kernel)."""

    factor: float
    exact = False

    def forward(self, x):
        return x * np.float32(self.factor)

    def inverse(self, y):
        return y / np.float32(self.factor)


@dataclass(repr=False)
class Offset(Transform):
    """Add a constant (Gemma's RMSNorm multiplies by 1+w in HF, by w in MaxText)."""

    value: float
    exact = False

    def forward(self, x):
        return x + np.float32(self.value)

    def inverse(self, y):
        return y - np.float32(self.value)


class Split:
    """One HF tensor <-> several equally shaped parts, each its own MaxText array (e.g. a fused gate/up kernel).

    `take(x, k)` is part k of HF tensor x; `join(parts)` rebuilds x from all parts (the exact inverse).
    """

    n: int

    def take(self, x: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def join(self, parts: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


@dataclass(repr=False)
class Deinterleave(Split):
    """Part k is every n-th element along `axis` starting at k (GPT-OSS gate_up_proj: even = gate, odd = up)."""

    n: int = 2
    axis: int = -1

    def take(self, x, k):
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(k, None, self.n)
        return x[tuple(index)]

    def join(self, parts):
        first = parts[0]
        shape = list(first.shape)
        shape[self.axis] *= self.n
        out = np.empty(shape, first.dtype)
        for k, part in enumerate(parts):
            index = [slice(None)] * out.ndim
            index[self.axis] = slice(k, None, self.n)
            out[tuple(index)] = part
        return out


@dataclass(repr=False)
class Chunks(Split):
    """Part k is the k-th of n equal contiguous blocks along `axis` (Qwen3-VL's vision `qkv`: q, k, v row blocks)."""

    n: int = 3
    axis: int = 0

    def take(self, x, k):
        size = x.shape[self.axis] // self.n
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(k * size, (k + 1) * size)
        return x[tuple(index)]

    def join(self, parts):
        return np.concatenate(parts, axis=self.axis)


@dataclass(repr=False)
class Sections(Split):
    """Part k is the k-th run of `sizes[k]` consecutive entries along axis 0, reshaped to `shapes[k]`; `rest` is the
    HF tensor's shape after axis 0 (DeepSeek-V4's hyper-connection `hc_*_fn` rows and `hc_*_base` entries: n pre, n
    post, then n*n residual ones, the last an `[n, n]` matrix in MaxText). `join` puts each part back as its rows."""

    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    rest: tuple[int, ...] = ()

    def __post_init__(self):
        assert len(self.sizes) == len(self.shapes), (self.sizes, self.shapes)
        self.n = len(self.sizes)

    def take(self, x, k):
        start = sum(self.sizes[:k])
        return x[start : start + self.sizes[k]].reshape(self.shapes[k])

    def join(self, parts):
        return np.concatenate([p.reshape((n, *self.rest)) for p, n in zip(parts, self.sizes)], axis=0)


@dataclass(frozen=True, repr=False)
class Fusion:
    """Several HF tensors that the rules read as one (the inverse of `Split`; Qwen3.5's `in_proj_qkv` + `in_proj_z`
    -> Qwen3-Next's `in_proj_qkvz`). `name`: the fused tensor the rules name; `parts`: (name, shape) of the tensors
    on disk, equal but for axis 0; `join(xs)` builds the fused tensor from them (their rows, reordered), `take(x, k)`
    is part k of it -- exact inverses that only move elements. Reading presents `name` in place of the parts
    (converters/convert/hf_source.py); export writes the parts (converters/convert/to_hf.py)."""

    name: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    join: object  # Callable[[list[np.ndarray]], np.ndarray]
    take: object  # Callable[[np.ndarray, int], np.ndarray]

    def __repr__(self) -> str:
        return f"Fusion({self.name!r} <- {[n for n, _ in self.parts]})"


@dataclass(frozen=True)
class Slices:
    """One HF tensor that the rules read as several, each `disk[index]` with `index[0]` an int (a row of the leading
    axis): Qwen3.5's published fused experts, `gate_up_proj` `[X, 2F, emb]`, read as transformers' per-expert
    `experts.{e}.gate_proj` / `up_proj` `[F, emb]`. Reading presents the `views` (name, index) in place of `disk`
    (converters/convert/hf_source.py); export writes the views' names."""

    disk: str
    views: tuple[tuple[str, tuple], ...]


def run_chain(
    chain: tuple[Transform, ...], x: np.ndarray, out_dtype: np.dtype | None, inverse: bool = False
) -> np.ndarray:
    """Apply a chain (forward, or inverted in reverse order), computing in float32 only when a step changes values.
    `out_dtype` None: the result as computed (the input's dtype when the chain only moves elements, else float32)."""
    steps = tuple(reversed(chain)) if inverse else chain
    if not all(t.exact for t in steps):
        x = x.astype(np.float32)
    for t in steps:
        x = t.inverse(x) if inverse else t.forward(x)
    # Kernels come out contiguous (tiled transposes); other steps may leave a strided view, which the
    # writers copy once when they need the bytes.
    return x if out_dtype is None else x.astype(out_dtype, copy=False)
