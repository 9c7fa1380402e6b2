"""Large numpy buffers that are handed out again once nothing references them.

A conversion moves every byte of the model through a few large buffers (the source bytes, a transposed
copy). Fresh memory for each one costs the kernel a page fault and a zeroed page per 4 KB (on a VM often a
host fault too): in a profile of a conversion that was its largest single cost (docs/performance.md, "Speed").
The pool keeps buffers of the sizes a model uses and reuses one as soon as no array, view, memoryview or torch
tensor refers to it any more, which Python's reference count tells exactly.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

ALIGN = 4096  # page (and O_DIRECT block) alignment of every pooled buffer
MIN_POOLED = 1 << 20  # smaller buffers come from malloc's heap, which already reuses them
_ROUND = 2 << 20  # capacities are multiples of a huge page: few size classes, THP-backed


class BufferPool:
    """Thread-safe pool of page-aligned buffers. `empty()` is a drop-in for `np.empty` on large shapes.

    A buffer is free when only the pool holds it. Before a new buffer is allocated, free ones are dropped
    (largest first) while the total would exceed `keep_bytes`: the pool holds what the pipeline has in
    flight, or `keep_bytes` if that is more."""

    def __init__(self, keep_bytes: int = 512 << 20):
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._bufs: list[np.ndarray] = []
        self.allocated = 0  # buffers ever allocated (tests and benchmarks look at reuse)

    def _free(self) -> list[int]:
        # a free buffer is referenced by the pool's list and by getrefcount's argument only
        return [i for i in range(len(self._bufs)) if sys.getrefcount(self._bufs[i]) == 2]

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = self._free()
            fits = [i for i in free if nbytes <= self._bufs[i].nbytes - ALIGN <= 2 * nbytes + _ROUND]
            if fits:
                return self._bufs[min(fits, key=lambda i: self._bufs[i].nbytes)]
            cap = -(-nbytes // _ROUND) * _ROUND
            total = sum(b.nbytes for b in self._bufs) + cap + ALIGN
            drop = set()
            for i in sorted(free, key=lambda i: -self._bufs[i].nbytes):
                if total <= self.keep_bytes:
                    break
                total -= self._bufs[i].nbytes
                drop.add(i)
            self._bufs = [b for i, b in enumerate(self._bufs) if i not in drop]
            fresh = np.empty(cap + ALIGN, np.uint8)
            self._bufs.append(fresh)
            self.allocated += 1
            return fresh

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array, page-aligned, from the pool when it is large."""
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED:
            return np.empty(shape, dtype)
        return _aligned_part(self._take(nbytes), nbytes).view(dtype).reshape(shape)

    def trim(self) -> None:
        """Let go of every free buffer (a conversion is over: a long-lived process need not keep them)."""
        with self._lock:
            free = set(self._free())
            self._bufs = [b for i, b in enumerate(self._bufs) if i not in free]

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer the pool holds, in use or spare."""
        with self._lock:
            return sum(b.nbytes for b in self._bufs)

    @property
    def spare_bytes(self) -> int:
        """Bytes of the buffers free for reuse."""
        with self._lock:
            return sum(self._bufs[i].nbytes for i in self._free())


POOL = BufferPool()


def empty(shape, dtype) -> np.ndarray:
    """`np.empty` from the process-wide pool."""
    return POOL.empty(shape, dtype)


def aligned(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer of `nbytes` (O_DIRECT needs that), pooled when large."""
    if nbytes >= MIN_POOLED:
        return POOL.empty((nbytes,), np.uint8)
    return _aligned_part(np.empty(nbytes + ALIGN, np.uint8), nbytes)


def _aligned_part(raw: np.ndarray, nbytes: int) -> np.ndarray:
    """The first page-aligned `nbytes` of `raw` (a uint8 buffer at least ALIGN bytes longer)."""
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]
