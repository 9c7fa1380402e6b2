"""The destination lock: one writer at a time per output folder (`flock` on a hidden sibling of it)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

LOCK_MARK = ".ckptflow-lock"

_held_locks: dict[tuple[str, int], list] = {}  # (lock file, thread) -> [fd, depth]: re-entrant per thread


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}{LOCK_MARK}"


@contextlib.contextmanager
def destination_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock on writing `out`: `flock` on the hidden sibling `.NAME.ckptflow-lock`.

    A second process (or thread) writing the same destination waits here until the first is done (it says so
    once on stderr), then sees what the first left. Re-entrant within a thread. The lock file is removed on
    release; one left by a killed process holds no lock (the kernel drops it with the process) and is reused.
    """
    path = lock_path(out)
    key = (str(path), threading.get_ident())
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, Path(out).absolute())
    _held_locks[key] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding it: a waiter on this inode sees it gone and opens the new one
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                    print(
                        f"ckptflow: {out} is being written by {holder}; waiting for it to finish",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # a file system without locks (some FUSE/network mounts): go on unlocked
                if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL):
                    raise
                print(
                    f"ckptflow: warning: {out.parent} does not support file locks ({e.strerror}); "
                    "concurrent runs writing the same destination are not kept apart",
                    file=sys.stderr,
                    flush=True,
                )
                return fd
            st = os.fstat(fd)
            try:
                cur = os.stat(path)
                current = (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed this file as it released it: lock the current one
