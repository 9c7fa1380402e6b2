"""Reading and writing model bytes around the page cache (O_DIRECT), with pooled buffers.

A conversion reads every source byte once. Through the page cache that is a page-cache fill and a copy
into our buffer per byte; with O_DIRECT the disk writes straight into the (reused, page-aligned) buffer, which
saves most of the kernel CPU time and some wall time (docs/performance.md, "Speed").
Ranges that are already cached (a file just downloaded) are read through the cache instead, and
filesystems without O_DIRECT (tmpfs, some FUSE mounts) fall back to plain reads. `SequentialWriter` writes a
file the same way; `evict` frees the pages of files others wrote (tensorstore), so that writing does not fill
the page cache either.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading
from typing import Iterator

import numpy as np

from converters.errors import CorruptFileError
from converters.io import buffers
from converters.io.buffers import ALIGN, POOL

MIN_DIRECT = 1 << 20  # smaller reads are not worth bypassing the cache
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_no_direct: set[str] = set()  # files whose filesystem refused O_DIRECT: not tried again


def _cached(fd: int, offset: int) -> bool:
    """Whether the page at `offset` is in the page cache (a non-blocking 1-byte read succeeds only then)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return False
    try:
        return os.preadv(fd, [bytearray(1)], offset, flag) == 1
    except OSError:
        return False


def _set_direct(fd: int) -> bool:
    """Switch an open file to O_DIRECT; False where its filesystem has none (EINVAL: tmpfs, some FUSE mounts)."""
    if not _O_DIRECT:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return True


def _fill(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            break
        got += n
    return got


def _read_direct(path: str, offset: int, nbytes: int) -> np.ndarray | None:
    """`nbytes` at `offset` read with O_DIRECT into a pooled buffer; None when that is not possible here."""
    if not _O_DIRECT or path in _no_direct:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _cached(fd, offset) and _cached(fd, offset + nbytes - 1):
            return None
        if not _set_direct(fd):
            _no_direct.add(path)
            return None
        lo = offset - offset % ALIGN
        hi = -(-(offset + nbytes) // ALIGN) * ALIGN
        buf = POOL.empty((hi - lo,), np.uint8)
        try:
            got = _fill(fd, memoryview(buf), lo)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the device wants another alignment
                raise
            _no_direct.add(path)
            return None
        if got < offset + nbytes - lo:
            raise CorruptFileError(f"{path}: unexpected end of file at byte {lo + got} (wanted {offset + nbytes})")
        return buf[offset - lo : offset - lo + nbytes]
    finally:
        os.close(fd)


def read_blocks(
    path: str | os.PathLike, chunk: int = 1 << 20, offset: int = 0, nbytes: int | None = None
) -> Iterator[memoryview]:
    """A file's bytes front to back (or `nbytes` of them from `offset`), in blocks read into one reused buffer
    (each valid until the next is read). Ends early, without an error, where the file does.

    A fresh `bytes` per read above glibc's mmap threshold is a new mapping whose pages the kernel faults in and
    zeroes each time, which made a hashing read loop several times slower (docs/performance.md, "Speed")."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    left = nbytes
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while left is None or left > 0:
            n = f.readinto(view if left is None or left >= chunk else view[:left])
            if not n:
                return
            if left is not None:
                left -= n
            yield view[:n]


def _read_buffered(path: str, offset: int, nbytes: int) -> np.ndarray:
    buf = POOL.empty((nbytes,), np.uint8)
    with open(path, "rb", buffering=0) as f:
        got = _fill(f.fileno(), memoryview(buf), offset) if nbytes else 0
    if got < nbytes:
        raise CorruptFileError(f"{path}: unexpected end of file at byte {offset + got} (wanted {offset + nbytes})")
    return buf


def read_range(path: str | os.PathLike, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes of a file from `offset`, as a uint8 array in a pooled buffer."""
    path = os.fspath(path)
    if nbytes >= MIN_DIRECT:
        out = _read_direct(path, offset, nbytes)
        if out is not None:
            return out
    return _read_buffered(path, offset, nbytes)


def _advise(target: str | os.PathLike | int, offset: int, nbytes: int, name: str) -> None:
    """`posix_fadvise(..., os.<name>)` on an open fd or a path where the platform has it; only a hint, so nothing
    is raised."""
    if not hasattr(os, "posix_fadvise"):
        return
    advice = getattr(os, name)
    try:
        if isinstance(target, int):
            os.posix_fadvise(target, offset, nbytes, advice)
            return
        fd = os.open(target, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, nbytes, advice)
        finally:
            os.close(fd)
    except OSError:
        pass


def advise_willneed(path: str | os.PathLike, offset: int, nbytes: int) -> None:
    """Ask the kernel to start reading a range that will be read through the page cache (`posix_fadvise`
    `POSIX_FADV_WILLNEED`: a hint, nothing is read by us and nothing is held in memory by us).

    Ranges read with O_DIRECT are not advised: a read of our own ahead of time was no faster (the other
    workers keep the disk busy meanwhile; docs/performance.md, "Speed") and held one more piece per worker in
    memory."""
    path = os.fspath(path)
    if not (nbytes >= MIN_DIRECT and _O_DIRECT and path not in _no_direct):
        _advise(path, offset, nbytes, "POSIX_FADV_WILLNEED")


def evict(target: str | os.PathLike | int, offset: int = 0, nbytes: int = 0) -> None:
    """Let the kernel drop a written file's (or fd's byte range's) pages from the page cache: dirty ones are
    queued for writeback, clean ones freed now.

    Streaming a large output through the page cache otherwise fills memory with pages nobody reads again,
    each one a fresh page to allocate (on a VM also to fault in from the host); freed early, the same pages
    are reused for the next writes: evicting ranges written a few hundred MB earlier as the writing goes on
    made a large write several times faster (docs/performance.md, "Speed").
    """
    _advise(target, offset, nbytes, "POSIX_FADV_DONTNEED")


class SequentialWriter:
    """A new file written front to back around the page cache: bytes are copied into one of two page-aligned
    staging buffers, and a thread writes each full buffer with O_DIRECT while the other one fills. Where the
    filesystem refuses O_DIRECT, plain writes with the written range evicted as the writing goes on.

    Through the page cache, a write costs a page-cache fill per byte, kernel CPU time that O_DIRECT does not
    spend (docs/performance.md, "Speed"). The file is exactly the bytes given:
    the last, partial block is written padded and the file then truncated to its size."""

    STAGE = 32 << 20  # bytes per direct write
    EVICT_LAG = 128 << 20  # plain writes: written bytes left in the page cache before they are evicted

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.size = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self.direct = _set_direct(self._fd)
        except OSError:
            os.close(self._fd)
            raise
        self._evicted = 0
        if self.direct:
            self._free: queue.Queue = queue.Queue()
            for _ in range(2):
                self._free.put(buffers.aligned(self.STAGE))
            self._todo: queue.Queue = queue.Queue()
            self._error: BaseException | None = None
            self._stage, self._fill, self._offset = self._free.get(), 0, 0
            self._thread = threading.Thread(target=self._run, name="ckptflow-direct-write", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            buf, nbytes, offset = job
            if self._error is None:
                try:
                    view, done = memoryview(buf)[:nbytes], 0
                    while done < nbytes:
                        done += os.pwrite(self._fd, view[done:], offset + done)
                except BaseException as e:  # noqa: BLE001 - raised in the writing thread at its next call
                    self._error = e
            self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, padded: int) -> None:
        self._todo.put((self._stage, padded, self._offset))
        self._offset += padded
        self._stage, self._fill = self._free.get(), 0
        self._check()

    def write(self, data) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        if not self.direct:
            done = 0
            while done < len(view):
                done += os.write(self._fd, view[done:])
            self.size += len(view)
            if self.size - self._evicted >= 2 * self.EVICT_LAG:
                self._evicted = self.size - self.EVICT_LAG
                evict(self._fd, 0, self._evicted)
            return
        src = np.frombuffer(view, np.uint8) if len(view) else np.empty(0, np.uint8)
        done = 0
        while done < len(src):
            n = min(len(src) - done, self.STAGE - self._fill)
            self._stage[self._fill : self._fill + n] = src[done : done + n]
            self._fill += n
            done += n
            if self._fill == self.STAGE:
                self._submit(self.STAGE)
        self.size += len(src)

    def close(self) -> None:
        """Write what is left, cut the file to its size and make it durable (fsync)."""
        try:
            if self.direct:
                if self._fill:
                    padded = -(-self._fill // ALIGN) * ALIGN
                    self._stage[self._fill : padded] = 0
                    self._submit(padded)
                self._stop()
                self._check()
                os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self._close_fd()

    def abort(self) -> None:
        """Stop after a failure; the file is left as it is for the caller to remove."""
        if self.direct:
            self._stop()
        self._close_fd()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
