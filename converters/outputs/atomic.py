"""Atomic output folders: written in a hidden temp sibling, moved into place whole, under the destination lock."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

from converters.errors import CkptflowError, OutputExistsError
from converters.outputs.lock import destination_lock

TMP_MARK = ".ckptflow-tmp-"
OLD_MARK = ".ckptflow-old-"


def _clean_stale_temps(out: Path) -> None:
    """Remove temp (and replaced-version) siblings that killed runs left for the same destination.

    Called with the destination's lock held: no live process is writing any of them (a writer holds the lock),
    so they all go, whatever their PID (a killed run's PID may since belong to another process).
    """
    prefixes = (f".{out.name}{TMP_MARK}", f".{out.name}{OLD_MARK}")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if p.name.startswith(prefixes):
            remove_tree(p)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_destination(out: str | os.PathLike, overwrite: bool) -> None:
    """Fail before doing any work when the destination exists and may not be replaced."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{Path(out).absolute()} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp sibling of `out` to write into; move it into place only if the block succeeds.

    A failed run removes its temp folder; a killed one leaves only a hidden `.NAME.ckptflow-tmp-PID-*`
    folder, which the next run for the same destination removes. `out` never holds a partial result: it is
    absent, the previous complete version, or the new complete one (an existing `out` is swapped with the
    new folder in one atomic rename where the OS allows it).

    The whole block runs under `destination_lock(out)`: a concurrent run for the same destination waits,
    then finds `out` as this one left it (and fails unless `overwrite`).
    """
    check_destination(out, overwrite)  # fail fast, before waiting for the lock
    out = Path(out).absolute()
    with destination_lock(out):
        check_destination(out, overwrite)  # again: a run we waited for may have written it
        _clean_stale_temps(out)
        tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            _fsync_tree(tmp)
            if out.exists():
                if _exchange(tmp, out):  # tmp now holds the old version
                    _fsync_dir(out.parent)
                    remove_tree(tmp)
                else:
                    old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
                    out.rename(old)
                    tmp.rename(out)
                    remove_tree(old)
            else:
                tmp.rename(out)
            _fsync_dir(out.parent)
        except BaseException as e:
            remove_tree(tmp)
            if _no_space(e):  # from Python's own writes (OSError) or tensorstore's (ValueError quoting errno 28)
                free = shutil.disk_usage(out.parent).free
                raise CkptflowError(
                    f"no space left on the device of {out.parent} while writing {out.name} "
                    f"({free / 1e6:.0f} MB free once the partial output was removed; nothing was written)"
                ) from None
            raise


def _no_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e) if isinstance(e, Exception) else ""
    return "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text


def remove_tree(path: Path) -> None:
    """rmtree that also catches files a just-cancelled background writer was still closing."""
    import time

    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder so the rename that publishes them cannot outrun their data."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
