"""The buffer pool hands a buffer out again only once nothing refers to it."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import torch

from converters.io.buffers import ALIGN, MIN_POOLED, BufferPool

SHAPE = (1024, 1024)  # 2 MB of bf16: pooled


def test_arrays_are_aligned_contiguous_and_of_the_asked_shape():
    pool = BufferPool()
    a = pool.empty(SHAPE, ml_dtypes.bfloat16)
    assert a.shape == SHAPE and a.dtype == ml_dtypes.bfloat16 and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % ALIGN == 0
    small = pool.empty((10,), np.float32)  # below MIN_POOLED: plain numpy
    assert small.nbytes < MIN_POOLED and pool.allocated == 1


def test_a_released_buffer_is_reused():
    pool = BufferPool()
    a = pool.empty(SHAPE, np.float32)
    first = a.ctypes.data
    del a
    b = pool.empty(SHAPE, np.float32)
    assert b.ctypes.data == first and pool.allocated == 1


def test_nothing_still_referenced_is_handed_out():
    """Views, memoryviews, torch tensors and arrays tensorstore keeps all hold the buffer."""
    pool = BufferPool()
    holders = []
    for make in (lambda a: a[1:], lambda a: memoryview(a), lambda a: torch.from_numpy(a), lambda a: a.reshape(-1)):
        a = pool.empty(SHAPE, np.float32)
        a[:] = len(holders)
        holders.append(make(a))
        del a
    others = [pool.empty(SHAPE, np.float32) for _ in range(3)]
    for o in others:
        o[:] = -1
    for k, h in enumerate(holders):  # the held buffers kept their contents
        assert float(np.asarray(h).reshape(-1)[0]) == k
    assert pool.allocated == 7
    holders.clear()
    pool.empty(SHAPE, np.float32)
    assert pool.allocated == 7  # a released one came back


def test_a_larger_free_buffer_serves_a_smaller_request_but_not_a_tiny_one():
    pool = BufferPool()
    big = pool.empty((4 << 20,), np.uint8)
    del big
    pool.empty((3 << 20,), np.uint8)
    assert pool.allocated == 1
    pool2 = BufferPool()
    huge = pool2.empty((64 << 20,), np.uint8)
    del huge
    pool2.empty((2 << 20,), np.uint8)  # would waste 62 MB: a buffer of its own
    assert pool2.allocated == 2


def test_free_buffers_beyond_the_budget_are_dropped():
    pool = BufferPool(keep_bytes=16 << 20)
    for n in (4, 6, 8, 10):  # each size its own class; each released before the next is asked for
        pool.empty((n << 20,), np.uint8)
    assert pool.held_bytes <= pool.keep_bytes  # 28 MB if nothing were dropped


def test_threads_never_share_a_buffer():
    pool = BufferPool()
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()
    errors = []

    def work(k):
        for _ in range(50):
            a = pool.empty(SHAPE, np.int32)
            a[:] = k
            with lock:
                seen.append((k, a.ctypes.data))
            if not (a == k).all():
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.allocated <= 8  # reused, not one per request


def test_trim_lets_go_of_spare_buffers_only():
    pool = BufferPool()
    kept = pool.empty(SHAPE, np.float32)
    spare = pool.empty(SHAPE, np.float32)
    del spare
    assert pool.spare_bytes > 0
    pool.trim()
    assert pool.spare_bytes == 0 and pool.held_bytes >= kept.nbytes
    kept[:] = 1  # still ours
