"""Keep freed tensor buffers from piling up in the C heap (glibc only; elsewhere nothing happens).

glibc serves allocations above its mmap threshold with their own mappings, returned to the OS when freed, but
it raises that threshold (up to 32 MB) each time such a block is freed. After a few tensors, every layer
slice of up to 32 MB is carved from the heap arenas of whichever thread made it, and freed ones are kept
there: resident memory then grows with the number of slices converted, not with the largest one (measured:
+180 MB from 2 to 16 layers of 16 MB slices; flat with the threshold fixed).
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
_done = False


def fix_mmap_threshold() -> None:
    """Pin the threshold at 4 MB (setting it explicitly also stops glibc from moving it)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass
