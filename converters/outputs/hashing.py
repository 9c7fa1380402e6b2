"""Hashing what ckptflow writes: the content hash (BLAKE3), file digests, array and chunk digests, and the
background hasher that takes each finished file while a writer goes on with others (then drops its pages from
the page cache).

A leaf: it imports nothing of ckptflow's but `converters.io.direct_io`, so the file formats (`converters.io`)
can hash what they write without importing the rest of `converters.outputs`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from converters.io import direct_io

log = logging.getLogger("ckptflow.outputs")

# What the bytes ckptflow writes are hashed with: BLAKE3, cryptographic like sha256 but more than twice as fast on
# one core (docs/performance.md, "Speed"), and it releases the GIL. Every output file's digest in the manifest and every
# tensor or chunk digest under the manifest's `output_digest` is one; a conversion takes both while it writes (two
# passes over each byte, on threads of their own). sha256 stays where others fix the algorithm: hub LFS ids
# (download) and publish's staging records.
CONTENT_HASH = "blake3"


def content_hasher(data=b""):
    """A new BLAKE3 hasher (`update`, `hexdigest`, like hashlib's), over `data` so far."""
    from blake3 import blake3

    return blake3(data)


def file_digests(path: Path, names: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """{name: hex digest} of a file for each hash in `names` ("sha256", "blake3"), in one read."""
    hs = {n: content_hasher() if n == CONTENT_HASH else hashlib.new(n) for n in names}
    for block in direct_io.read_blocks(path):
        for h in hs.values():
            h.update(block)
    return {n: h.hexdigest() for n, h in hs.items()}


def file_sha256(path: Path) -> str:
    """A file's sha256."""
    return file_digests(path)["sha256"]


def file_blake3(path: Path) -> str:
    """A file's BLAKE3 (`CONTENT_HASH`): what the manifest records of every output file."""
    return file_digests(path, (CONTENT_HASH,))[CONTENT_HASH]


def array_bytes(a) -> memoryview:
    """The little-endian C-order bytes of an array, without a copy when it already is one."""
    import numpy as np

    a = np.asarray(a)
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")


def chunked_digest(chunks: dict[tuple[int, ...], str]) -> str:
    """An Orbax array's digest from the digest (`content_hasher`) of each stored chunk, keyed by the chunk's
    origin: equal however the chunks were written (one process, several parts, any order), and computable while
    they are written."""
    h = hashlib.sha256(b"ckptflow-chunks-v2\n")
    for origin in sorted(chunks):
        h.update(f"{list(origin)}\0{chunks[origin]}\n".encode())
    return h.hexdigest()


class FileHasher:
    """Hashes the files another writer (tensorstore) finishes under `root` while it is still writing others, so
    the manifest need not read them all afterwards.

    Once hashed, a file's pages are dropped from the page cache (`direct_io.evict`), which keeps the pages a
    conversion writes through few and reused.

    A file is taken once it has not changed for `settle` seconds, and its digest (`file_blake3`) is kept only if
    its size and mtime are the same after hashing as before; `known()` then returns it only for files still of
    that inode, size and mtime, under whatever name they have now (Orbax renames its temp folders at the end).
    Anything that changed afterwards is simply hashed again by the manifest.
    """

    def __init__(self, root: Path, settle: float = 0.5, skip: tuple[str, ...] = ("manifest.ocdbt",)):
        self.root, self.settle, self.skip = Path(root), settle, skip
        self._done: dict[tuple[int, int, int, int], str] = {}  # (dev, inode, size, mtime_ns) -> blake3
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="ckptflow-file-hash", daemon=True)

    def __enter__(self) -> FileHasher:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _run(self) -> None:
        import time

        while not self._stop.wait(0.2):
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    if self._stop.is_set():
                        return
                    if name in self.skip or name.endswith(".__lock"):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                        if self._key(st) in self._done or time.time() - st.st_mtime < self.settle:
                            continue
                        digest = file_blake3(Path(path))
                        if self._key(os.stat(path)) == self._key(st):
                            self._done[self._key(st)] = digest
                            _drop_pages(path)
                    except OSError:  # renamed or removed meanwhile: looked at again on the next pass, if still there
                        continue
                    except Exception as e:  # noqa: BLE001 - a bug here must not fail the conversion, nor pass unseen
                        log.warning(
                            "background file hashing stopped (%s: %s); the manifest hashes the remaining files "
                            "itself, and written files stay in the page cache",
                            type(e).__name__,
                            e,
                        )
                        return

    def known(self, folder: Path) -> dict[str, str]:
        """{path relative to `folder`: blake3} of the files under `folder` hashed unchanged."""
        out = {}
        for p in Path(folder).rglob("*"):
            try:
                digest = self._done.get(self._key(p.stat())) if p.is_file() else None
            except OSError:
                digest = None
            if digest:
                out[p.relative_to(folder).as_posix()] = digest
        return out


def _drop_pages(path: str) -> None:
    """Free a finished file's pages from the page cache. Synced first: `POSIX_FADV_DONTNEED` leaves dirty pages
    alone, and a file hashed before its writer's own fsync would otherwise stay cached for good: the page cache
    then grows by the model's size, and tensorstore's writes into fresh pages are slower than into reused ones
    (docs/performance.md, "Speed")."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        direct_io.evict(fd)
    finally:
        os.close(fd)
