"""Keep freed tensor buffers from piling up in the C heap (glibc only; elsewhere nothing happens).

glibc serves allocations above its mmap threshold with their own mappings, returned to the OS when freed, but
it raises that threshold (up to 32 MB) each time such a block is freed. After a few tensors, every layer
slice of up to 32 MB is carved from the heap arenas of whichever thread made it, and freed ones are kept
there: resident memory then grows with the number of slices converted, not with the largest one; with the
threshold fixed it stays flat (docs/performance.md, "Memory").

The number of heap arenas is capped too: the smaller blocks tensorstore's threads allocate and free while
encoding and committing spread over up to 8 arenas per core, each keeping its freed memory; with one arena the
peak is lower at the same speed (large buffers come from mmap or the buffer pool anyway; docs/performance.md,
"Memory").
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20
ARENA_MAX = 1
_done = False


def fix_mmap_threshold() -> None:
    """Pin the threshold at 4 MB (setting it explicitly also stops glibc from moving it), and use one arena."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass
