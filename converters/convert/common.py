"""What both conversion directions share: the dtypes they write, their result, block sizes, buffer release."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.errors import CkptflowError
from converters.io import buffers

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
ROW_CHUNK_BYTES = 64 << 20  # large 2-D tensors (embedding, lm_head) are streamed in blocks of about this size


@dataclass
class Result:
    """What a conversion wrote: where, the family, the bytes and the number of tensors (arrays) this process wrote."""

    out: Path
    family: str
    bytes: int
    tensors: int


def dtype_named(name: str) -> np.dtype:
    """The numpy dtype of `--dtype NAME`; a one-line error for any other name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CkptflowError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def listing(names, limit: int = 8) -> str:
    """`names` sorted, comma-separated, cut after `limit` for an error message."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def returns_buffers(fn):
    """The buffer pool's spare buffers are let go when a conversion ends, however it ends."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            buffers.POOL.trim()

    return run
