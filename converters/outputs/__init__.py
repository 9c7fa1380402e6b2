"""Atomic output folders, sidecar files and the lineage manifest written beside every conversion."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from pathlib import Path
from typing import Iterator

from converters import __version__

from converters.io import direct_io
from converters.errors import CkptflowError, OutputExistsError

log = logging.getLogger("ckptflow.outputs")

MANIFEST = "ckptflow-manifest.json"
DOWNLOAD_MANIFEST = "ckptflow-download.json"  # written by `ckptflow download` into the folder it stages
SIDECAR = Path("ckptflow") / "hf"  # source HF config + tokenizer, kept beside a MaxText checkpoint
TMP_MARK = ".ckptflow-tmp-"
OLD_MARK = ".ckptflow-old-"
LOCK_MARK = ".ckptflow-lock"

# Files (besides weights) an HF model folder needs to be used: config, generation defaults, tokenizer, processor.
HF_EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


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
            _remove(p)


# ------------------------------------------------------------------------------------ destination lock

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
                    print(f"ckptflow: {out} is being written by {holder}; waiting for it to finish", file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # a file system without locks (some FUSE/network mounts): go on unlocked
                if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL):
                    raise
                print(f"ckptflow: warning: {out.parent} does not support file locks ({e.strerror}); "
                      "concurrent runs writing the same destination are not kept apart", file=sys.stderr, flush=True)
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
                    _remove(tmp)
                else:
                    old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
                    out.rename(old)
                    tmp.rename(out)
                    _remove(old)
            else:
                tmp.rename(out)
            _fsync_dir(out.parent)
        except BaseException as e:
            _remove(tmp)
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


def _remove(path: Path) -> None:
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


def copy_hf_extras(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer files that exist in `src` (never weights, never pickles)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_EXTRA_FILES:
        if name in skip:
            continue
        p = src / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    return copied


# What the bytes ckptflow writes are hashed with: BLAKE3, cryptographic like sha256 but 2.5x faster here (4.3
# against 1.7 GB/s on one core), and it releases the GIL. Every output file's digest in the manifest and every
# tensor or chunk digest under `output_digest` is one; a conversion takes both while it writes (two passes over
# each byte, on threads of their own). sha256 stays where others fix the algorithm: hub LFS ids (download) and
# publish's staging records.
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


def file_digest(path: Path) -> str:
    """A file's sha256."""
    return file_digests(path)["sha256"]


def file_blake3(path: Path) -> str:
    """A file's BLAKE3 (`CONTENT_HASH`): what the manifest records of every output file."""
    return file_digests(path, (CONTENT_HASH,))[CONTENT_HASH]


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
                        log.warning("background file hashing stopped (%s: %s); the manifest hashes the remaining files "
                                    "itself, and written files stay in the page cache", type(e).__name__, e)
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
    alone, and a file hashed before its writer's own fsync would otherwise stay cached for good (measured: the
    cache then grew by GBs, and tensorstore's writes into fresh pages ran at 0.4 against 1.0 GB/s on this VM)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        direct_io.evict(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ lineage manifest


def describe_source(src: str | os.PathLike) -> dict:
    """The `source` section of a manifest: the folder, and when `ckptflow download` staged it, where it came from
    (`repo`, `uri`, resolved commit `revision`) and the size and sha256 of every source file.

    The download record is trusted only while every file it lists is still there with its size; otherwise
    only sizes are given (a local folder nobody hashed: re-reading 100+ GB here just for lineage is not done).
    """
    src = Path(src).absolute()
    out: dict = {"path": str(src)}
    record = None
    try:
        record = read_json(src / DOWNLOAD_MANIFEST, "download record")
    except CkptflowError:
        pass
    files = (record or {}).get("files") if isinstance((record or {}).get("files"), dict) else None
    if record and files and all((src / rel).is_file() and (src / rel).stat().st_size == (m or {}).get("size") for rel, m in files.items()):
        uri = str(record.get("source") or "")
        out["uri"] = uri
        if uri.startswith("hf://"):
            out["repo"] = uri.removeprefix("hf://")
        out["revision"] = record.get("revision")
        out["download_digest"] = record.get("digest")
        out["files"] = {rel: {"bytes": m.get("size"), "sha256": m.get("sha256")} for rel, m in sorted(files.items())}
    elif src.is_dir():
        out["files"] = {p.name: {"bytes": p.stat().st_size} for p in sorted(src.iterdir()) if p.is_file()}
    return out


def chunked_digest(chunks: dict[tuple[int, ...], str]) -> str:
    """An Orbax array's digest from the digest (`content_hasher`) of each stored chunk, keyed by the chunk's
    origin: equal however the chunks were written (one process, several parts, any order), and computable while
    they are written."""
    h = hashlib.sha256(b"ckptflow-chunks-v2\n")
    for origin in sorted(chunks):
        h.update(f"{list(origin)}\0{chunks[origin]}\n".encode())
    return h.hexdigest()


def array_bytes(a) -> memoryview:
    """The little-endian C-order bytes of an array, without a copy when it already is one."""
    import numpy as np

    a = np.asarray(a)
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")


def _tensor_sources(folder: Path):
    """(tensor name, shape fn, dtype fn, digest fn) of the checkpoint in `folder`, and the paths they cover.

    An HF folder's tensors come from its safetensors files (digest: BLAKE3 of the tensor's bytes); a MaxText
    folder's from its Orbax step folder (digest: `chunked_digest` over its stored chunks).
    """
    from converters.io.safetensors import SafetensorsFile

    shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if shards:
        tensors = {}
        for shard in shards:
            for name, info in SafetensorsFile(shard).tensors.items():
                tensors[name] = info
        items = []
        for name in sorted(tensors):
            info = tensors[name]

            def digest(info=info) -> str:
                h, got = content_hasher(), 0
                for block in direct_io.read_blocks(info.path, offset=info.start, nbytes=info.nbytes):
                    h.update(block)
                    got += len(block)
                if got < info.nbytes:
                    raise CkptflowError(f"{info.path}: truncated while reading {info.name!r}")
                return h.hexdigest()

            items.append((name, lambda info=info: info.shape, lambda info=info: info.dtype, digest))
        return items, {p.relative_to(folder).as_posix() for p in shards}, ()
    if not any(folder.rglob("_METADATA")):
        return [], set(), ()
    from converters.io.orbax import CheckpointReader

    reader = CheckpointReader(folder)
    items = []
    for key in sorted(reader.arrays):

        def digest(key=key) -> str:
            # One stored chunk at a time: a row block would cut across every chunk of a layer-chunked stack and
            # re-read the whole array once per block.
            shape = reader.shape(key)
            if not shape or 0 in shape:
                return chunked_digest({(0,) * len(shape): content_hasher(array_bytes(reader.read(key))).hexdigest()})
            chunk = reader.chunk_shape(key)
            chunks = {}
            for origin in itertools.product(*[range(0, n, c) for n, c in zip(shape, chunk)]):
                index = tuple(slice(o, min(n, o + c)) for o, n, c in zip(origin, shape, chunk))
                chunks[origin] = content_hasher(array_bytes(reader.read(key, index))).hexdigest()
            return chunked_digest(chunks)

        # shape and dtype open the array: only asked for when the writer did not say (see `output_digest`)
        items.append((key, lambda key=key: reader.shape(key), lambda key=key: reader.dtype(key), digest))
    step = reader.items.parent.relative_to(folder).as_posix() if folder in reader.items.parents else None
    return items, set(), (step,) if step else ()


def output_digest(folder: str | os.PathLike, file_hashes: dict[str, str] | None = None,
                  tensors: dict[str, tuple[tuple[int, ...], str, str]] | None = None) -> str:
    """A digest of what a checkpoint holds, equal for equal content across runs (Orbax file bytes are not:
    OCDBT file names, timestamps). sha256 over every tensor's name, shape, dtype and digest (see
    `_tensor_sources`) in name order, then over the path and BLAKE3 of every other file (configs, tokenizer,
    sidecars) except the manifest and the Orbax step folder (its `_CHECKPOINT_METADATA` holds a time stamp).

    `tensors` ({name: (shape, dtype name, digest)}) / `file_hashes` ({path: blake3}): what the writer computed
    as it wrote (those tensors and files are not read back, nor even opened).
    """
    folder = Path(folder).absolute()  # the Orbax step folder is recognised by absolute path
    items, covered, skip_dirs = _tensor_sources(folder)
    known = tensors or {}

    def line(item) -> str:
        name, shape, dtype, digest = item
        shape, dtype_name, d = known.get(name) or (shape(), dtype().name, digest())
        return f"tensor\0{name}\0{list(shape)}\0{dtype_name}\0{d}\n"

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:  # reads and hashing release the GIL
        lines = list(pool.map(line, items))
    h = hashlib.sha256(b"ckptflow-output-digest-v4\n")
    for text in lines:
        h.update(text.encode())
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel in covered or p.name in (MANIFEST, DOWNLOAD_MANIFEST):
            continue
        if any(rel == d or rel.startswith(d + "/") for d in skip_dirs):
            continue
        digest = (file_hashes or {}).get(rel) or file_blake3(p)
        h.update(f"file\0{rel}\0{digest}\n".encode())
    return "sha256:" + h.hexdigest()


def check_outputs(folder: str | os.PathLike, manifest: dict | None = None, files: dict[str, dict] | None = None) -> list[str]:
    """What no longer matches the manifest's `outputs` in `folder` (missing, extra, resized or changed files).

    Each file is compared by the digest its entry has: `blake3`, or `sha256` in manifests written before BLAKE3.
    `files`: the folder's files already hashed ({rel: {"size", and "blake3" and/or "sha256"}}, as `ckptflow
    publish` has them); what they lack is hashed here.
    """
    folder = Path(folder)
    if manifest is None:
        manifest = read_json(folder / MANIFEST, "ckptflow manifest")
    listed = manifest.get("outputs")
    if not isinstance(listed, dict) or not listed:
        return [f"{MANIFEST} lists no output files"]
    if files is None:
        files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size} for p in folder.rglob("*") if p.is_file()}
    on_disk = {rel: f for rel, f in files.items() if rel != MANIFEST}
    problems = [f"{rel}: missing" for rel in sorted(set(listed) - set(on_disk))]
    problems += [f"{rel}: not in the manifest" for rel in sorted(set(on_disk) - set(listed))]
    for rel in sorted(set(listed) & set(on_disk)):
        want, have = listed[rel] or {}, on_disk[rel]
        if want.get("bytes") is not None and want["bytes"] != have["size"]:
            problems.append(f"{rel}: {have['size']} bytes, the manifest says {want['bytes']}")
            continue
        algo = next((a for a in (CONTENT_HASH, "sha256") if want.get(a)), None)
        if algo and want[algo] != (have.get(algo) or file_digests(folder / rel, (algo,))[algo]):
            problems.append(f"{rel}: {algo} differs from the manifest")
    return problems


def record_verify(folder: str | os.PathLike, metrics: dict) -> dict:
    """Add the verify metrics to `folder`'s manifest (the file is replaced atomically; outputs are untouched)."""
    path = Path(folder) / MANIFEST
    manifest = read_json(path, "ckptflow manifest")
    manifest["verify"] = metrics
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return manifest


def write_manifest(folder: Path, *, direction: str, family: str, options: dict, source: dict, digest_files: bool = True,
                   file_hashes: dict[str, str] | None = None, tensors: dict[str, tuple] | None = None,
                   extra: dict | None = None) -> dict:
    """`ckptflow-manifest.json`: what was converted, how, and the size and BLAKE3 of every file written.

    Also `output_digest` (see `output_digest`), the digest a re-run of the same conversion reproduces.
    `file_hashes` ({path: blake3}) / `tensors` ({name: (shape, dtype name, digest)}): what the writers computed
    as they wrote (those files and tensors are not read back); `extra`: further top-level entries (e.g. the
    parts of a split conversion).
    """
    known = file_hashes or {}
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    digests: list = [None] * len(files)
    content_digest = None
    if digest_files:  # hashlib and tensorstore release the GIL: the file hashes and the content digest run at once
        from concurrent.futures import ThreadPoolExecutor

        def digest(p: Path) -> str:
            return known.get(p.relative_to(folder).as_posix()) or file_blake3(p)

        with ThreadPoolExecutor(max_workers=1 + min(3, os.cpu_count() or 1)) as pool:
            content = pool.submit(output_digest, folder, known, tensors)
            digests = list(pool.map(digest, files))
            content_digest = content.result()
    outputs = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, **({CONTENT_HASH: d} if d else {})} for p, d in zip(files, digests)
    }
    manifest = {
        "ckptflow_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "direction": direction,
        "family": family,
        "options": options,
        "source": source,
        "outputs": outputs,
        **(extra or {}),
    }
    if content_digest:
        manifest["output_digest"] = content_digest
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CkptflowError(f"{path}: {what} not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CkptflowError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CkptflowError(f"{path}: {what} must be a JSON object")
    return data
