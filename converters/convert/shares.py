"""Scale-out: one conversion split into N parts run by N processes (or pods), then finalized into one output.

Every part is given the same source and destination. Part I converts its share of the work into its own
folder under a staging folder beside the destination, `.NAME.ckptflow-parts/part-0000I-of-0000N/`, made
durable with the same atomic rename as any output, and records what it wrote in `part.json` (a fingerprint
of the conversion, its files with their BLAKE3, the digests of the tensors or chunks it wrote). `finalize` checks
that every part of the same conversion is there and intact, assembles the destination from them (hard links,
or moves where the file system has none; never a copy) and publishes it atomically; only then is the staging
folder removed.

Shares are contiguous runs of the work in source order, balanced by bytes: a part reads only the source
files its run covers (HF shards are written layer by layer) and the parts take about equally long.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from converters import __version__
from converters.io.files import read_json
from converters.outputs.atomic import remove_tree
from converters.outputs.hashing import CONTENT_HASH, file_blake3
from converters.outputs.manifest import DOWNLOAD_MANIFEST
from converters.errors import CkptflowError

PARTS_MARK = ".ckptflow-parts"
MARKER = "part.json"
FORMAT = "ckptflow-part-v2"  # v2: BLAKE3 file and chunk digests (v1 had sha256; the two never mix)
_PART_DIR = re.compile(r"^part-(\d{5})-of-(\d{5})$")


class PartsError(CkptflowError):
    """Finalize cannot proceed: a part is missing, stale or damaged."""


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` (0-based I, as Orbax process indices and Airflow map indices) -> (I, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise CkptflowError(f"--part {text!r}: expected I/N, e.g. 0/4 for the first of four parts")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise CkptflowError(f"--part {text}: I must be 0..N-1 (parts are numbered from 0) and N at least 1")
    return i, n


def staging_dir(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}{PARTS_MARK}"


def part_name(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def assign(sizes: Sequence[int], n: int) -> list[int]:
    """The part of each work item (given in source order): contiguous runs with about equal bytes each.

    An item goes to the part its middle byte falls in, so no part is more than one item over its share.
    """
    total = sum(sizes) or 1
    out, before = [], 0
    for s in sizes:
        out.append(min(n - 1, (2 * before + s) * n // (2 * total)))
        before += s
    return out


def source_identity(src: str | os.PathLike) -> dict:
    """What must not change between the parts and finalize: every source file's name, size and mtime, and the
    download record's digest when `ckptflow download` staged the folder (it names the revision). Not the folder's
    own path: pods may mount the same source at different paths."""
    src = Path(src).absolute()
    files = {}
    for p in sorted(src.rglob("*")) if src.is_dir() else []:
        if p.is_file() and PARTS_MARK not in p.as_posix():
            st = p.stat()
            files[p.relative_to(src).as_posix()] = [st.st_size, st.st_mtime_ns]
    record = {}
    if (src / DOWNLOAD_MANIFEST).is_file():
        try:
            record = read_json(src / DOWNLOAD_MANIFEST, "download record")
        except CkptflowError:
            record = {}
    return {"files": files, "download_digest": record.get("digest")}


def fingerprint(direction: str, family: str, options: dict, src: str | os.PathLike, config: dict) -> str:
    """One conversion's identity: parts and finalize must agree on it (N is recorded separately)."""
    blob = json.dumps({"direction": direction, "family": family, "options": options, "config": config,
                       "source": source_identity(src)}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Part:
    i: int
    n: int
    dir: Path
    marker: dict


def hash_files(root: Path, under: Path | None = None, known: dict[str, str] | None = None) -> dict[str, dict]:
    """{path relative to `root`: {bytes, blake3}} for every file below `under` (default: `root`), on two threads;
    `known`: digests already taken (see `converters.outputs.hashing.FileHasher`), not read again."""
    from concurrent.futures import ThreadPoolExecutor

    known = known or {}
    files = [p for p in sorted((under or root).rglob("*")) if p.is_file()]

    def digest(p: Path) -> str:
        return known.get(p.relative_to(root).as_posix()) or file_blake3(p)

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, files))
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, CONTENT_HASH: d} for p, d in zip(files, digests)}


def begin(out: str | os.PathLike, i: int, n: int, fp: str) -> Path:
    """Prepare the staging folder for part i of n; drop parts another conversion left there (their fingerprint
    or N differs: they can never be finalized with this one). Returns the part's final folder."""
    stage = staging_dir(out)
    stage.mkdir(parents=True, exist_ok=True)
    for d in stage.iterdir():
        m = _PART_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        marker = _read_marker(d)
        if int(m.group(2)) != n or (marker is not None and (marker.get("format") != FORMAT or marker.get("fingerprint") != fp)):
            remove_tree(d)
    return stage / part_name(i, n)


def write_marker(folder: Path, *, i: int, n: int, fp: str, direction: str, files: dict, digests: dict, extra: dict | None = None,
                 started: str) -> dict:
    marker = {
        "format": FORMAT,
        "ckptflow_version": __version__,
        "fingerprint": fp,
        "direction": direction,
        "part": i,
        "parts": n,
        "host": socket.gethostname(),
        "started": started,
        "finished": now(),
        "files": files,
        "digests": digests,
        **(extra or {}),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_marker(d: Path) -> dict | None:
    try:
        m = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def collect(out: str | os.PathLike, fp: str, direction: str) -> list[Part]:
    """Every part of this conversion, checked: all N present, same fingerprint, files as recorded. Else a one-line cause."""
    stage = staging_dir(out)
    if not stage.is_dir():
        raise PartsError(f"{stage}: no parts to finalize (run `ckptflow convert ... --part I/N` for every I first)")
    found: dict[int, dict[int, Path]] = {}
    for d in stage.iterdir():
        m = _PART_DIR.match(d.name)
        if m and d.is_dir():
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = d
    if not found:
        raise PartsError(f"{stage}: no finished parts (a part still running or killed leaves only a hidden temp folder)")
    if len(found) > 1:
        raise PartsError(f"{stage}: parts of different splits ({', '.join(f'N={k}' for k in sorted(found))}); re-run the parts of one")
    n, dirs = next(iter(found.items()))
    missing = [i for i in range(n) if i not in dirs]
    if missing:
        raise PartsError(f"part(s) {', '.join(f'{i}/{n}' for i in missing)} not finished (in {stage}); run them, then finalize again")
    parts = []
    for i in range(n):
        marker = _read_marker(dirs[i])
        if marker is None:
            raise PartsError(f"part {i}/{n}: {dirs[i] / MARKER} is missing or unreadable; re-run that part")
        if marker.get("format") != FORMAT:
            raise PartsError(f"part {i}/{n} was written by another ckptflow version ({marker.get('format')}, this one reads "
                             f"{FORMAT}); re-run it")
        if marker.get("fingerprint") != fp or marker.get("direction") != direction or marker.get("part") != i or marker.get("parts") != n:
            raise PartsError(f"part {i}/{n} is stale: it was written for another source, revision or options than this "
                             f"finalize ({marker.get('fingerprint', '?')[:19]} != {fp[:19]}); re-run it")
        for rel, f in (marker.get("files") or {}).items():
            p = dirs[i] / rel
            if not p.is_file() or p.stat().st_size != f.get("bytes"):
                raise PartsError(f"part {i}/{n}: {rel} is missing or not the size its record says; re-run that part")
        parts.append(Part(i, n, dirs[i], marker))
    return parts


class Assembly:
    """The parts' files put into the destination: hard links (no bytes copied, the parts intact until finalize
    succeeds); on file systems without hard links (GCS FUSE) they are moved instead, and moved back by `undo`
    if finalize fails (a finalize killed meanwhile leaves those parts to be re-run: finalize says which).

    Use as `with Assembly() as assembly:` around everything finalize does with the files: a failure inside
    moves them back before the temp folder is removed."""

    def __init__(self):
        self.moved: list[tuple[Path, Path]] = []

    def __enter__(self) -> Assembly:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.undo()

    def add_tree(self, src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
        """`src`'s files into `dst`, except those under the relative paths `skip`."""
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            if any(rel == k or rel.startswith(k + "/") for k in skip):
                continue
            target = dst / rel
            if p.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                os.rename(p, target)
                self.moved.append((p, target))

    def undo(self) -> None:
        for src, dst in reversed(self.moved):
            try:
                os.rename(dst, src)
            except OSError:
                pass
        self.moved.clear()


def summary(parts: list[Part]) -> list[dict]:
    """What the manifest records about each part."""
    return [
        {"part": p.i, "host": p.marker.get("host"), "started": p.marker.get("started"), "finished": p.marker.get("finished"),
         "bytes": p.marker.get("bytes"), "files": len(p.marker.get("files") or {}), "digest": part_digest(p.marker)}
        for p in parts
    ]


def part_digest(marker: dict) -> str:
    """One digest of what a part wrote (its files' and tensors' digests)."""
    blob = json.dumps({"files": marker.get("files"), "digests": marker.get("digests")}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def remove_staging(out: str | os.PathLike) -> None:
    remove_tree(staging_dir(out))
