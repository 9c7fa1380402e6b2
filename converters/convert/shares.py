"""Scale-out: one conversion split into N shares, one per process (or pod), then finalized into one output.

The CLI selects a process's share with `--part I/N`, and on disk a share is still a "part" (`part-0000I-of-0000N/`,
`part.json`, the manifest's `parts`): those names are a contract. In the code it is a share.

Every process is given the same source and destination. Share I is converted into its own folder under a
staging folder beside the destination, `.NAME.ckptflow-parts/part-0000I-of-0000N/`, made durable with the same
atomic rename as any output, with a record of what it wrote in `part.json` (a fingerprint of the conversion, its
files with their BLAKE3, the digests of the tensors or chunks it wrote). Finalize checks that every share of the
same conversion is there and intact, assembles the destination from them (hard links, or moves where the file
system has none; never a copy) and publishes it atomically; only then is the staging folder removed.

Shares are contiguous runs of the work in source order, balanced by bytes: a process reads only the source
files its run covers (HF shards are written layer by layer) and the processes take about equally long.

What a share converts is the conversion's business (`to_maxtext`, `to_hf`); this module does the bookkeeping:
who owns which work, the staging folder, the records, collecting and assembling the shares.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from converters import __version__
from converters.core.direction import Direction
from converters.errors import CkptflowError
from converters.io.files import read_json
from converters.outputs.atomic import atomic_dir, remove_tree
from converters.outputs.hashing import CONTENT_HASH, file_blake3
from converters.outputs.manifest import DOWNLOAD_MANIFEST

# On-disk names, a contract like the messages, which speak of parts as the CLI's `--part` does
STAGING_MARK = ".ckptflow-parts"
RECORD = "part.json"
FORMAT = "ckptflow-part-v2"  # v2: BLAKE3 file and chunk digests (v1 had sha256; the two never mix)
_SHARE_DIR = re.compile(r"^part-(\d{5})-of-(\d{5})$")


class SharesError(CkptflowError):
    """Finalize cannot proceed: a share is missing, stale or damaged."""


def parse_share(text: str) -> tuple[int, int]:
    """`--part I/N` (0-based I, as Orbax process indices and Airflow map indices) -> this process's share (I, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise CkptflowError(f"--part {text!r}: expected I/N, e.g. 0/4 for the first of four parts")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise CkptflowError(f"--part {text}: I must be 0..N-1 (parts are numbered from 0) and N at least 1")
    return i, n


def staging_dir(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}{STAGING_MARK}"


def share_name(i: int, n: int) -> str:
    """The folder of share i of n in the staging folder."""
    return f"part-{i:05d}-of-{n:05d}"


def assign(sizes: Sequence[int], n: int) -> list[int]:
    """The share of each work item (given in source order): contiguous runs with about equal bytes each.

    An item goes to the share its middle byte falls in, so no share is more than one item over its fair size.
    """
    total = sum(sizes) or 1
    out, before = [], 0
    for s in sizes:
        out.append(min(n - 1, (2 * before + s) * n // (2 * total)))
        before += s
    return out


def assign_by_position(positions: Sequence, sizes: Sequence[int], n: int) -> list[int]:
    """The share of each work item given where its source bytes are (any sortable position, e.g. (file rank,
    offset)): `assign` over the items in source order, so each share reads a contiguous run of the source."""
    order = sorted(range(len(sizes)), key=lambda k: (positions[k], k))
    owners = [0] * len(sizes)
    for k, owner in zip(order, assign([sizes[k] for k in order], n)):
        owners[k] = owner
    return owners


def source_identity(src: str | os.PathLike) -> dict:
    """What must not change between the shares and finalize: every source file's name, size and mtime, and the
    download record's digest when `ckptflow download` staged the folder (it names the revision). Not the folder's
    own path: pods may mount the same source at different paths."""
    src = Path(src).absolute()
    files = {}
    for p in sorted(src.rglob("*")) if src.is_dir() else []:
        if p.is_file() and STAGING_MARK not in p.as_posix():
            st = p.stat()
            files[p.relative_to(src).as_posix()] = [st.st_size, st.st_mtime_ns]
    record = {}
    if (src / DOWNLOAD_MANIFEST).is_file():
        try:
            record = read_json(src / DOWNLOAD_MANIFEST, "download record")
        except CkptflowError:
            record = {}
    return {"files": files, "download_digest": record.get("digest")}


def fingerprint(direction: Direction, family: str, options: dict, src: str | os.PathLike, config: dict) -> str:
    """One conversion's identity: the shares and finalize must agree on it (N is recorded separately)."""
    blob = json.dumps(
        {
            "direction": direction.record,
            "family": family,
            "options": options,
            "config": config,
            "source": source_identity(src),
        },
        sort_keys=True,
        default=str,
    )
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Share:
    """A finished share found by `collect`: its folder and its record (`part.json`)."""

    i: int
    n: int
    dir: Path
    record: dict


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
    return {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, CONTENT_HASH: d} for p, d in zip(files, digests)
    }


def begin(out: str | os.PathLike, i: int, n: int, fp: str) -> Path:
    """Prepare the staging folder for share i of n; drop shares another conversion left there (their fingerprint
    or N differs: they can never be finalized with this one). Returns the share's final folder."""
    stage = staging_dir(out)
    stage.mkdir(parents=True, exist_ok=True)
    for d in stage.iterdir():
        m = _SHARE_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        record = _read_record(d)
        if int(m.group(2)) != n or (
            record is not None and (record.get("format") != FORMAT or record.get("fingerprint") != fp)
        ):
            remove_tree(d)
    return stage / share_name(i, n)


@dataclass
class StagedShare:
    """A share being written (see `staged`): `dir` is its temp folder."""

    dir: Path
    i: int
    n: int
    fp: str
    direction: Direction
    started: str

    def write_record(self, *, files: dict, digests: dict, extra: dict | None = None) -> dict:
        """The share's record, the last thing written: what it wrote (`files`: {path below `dir`: {bytes, blake3}},
        `digests`: of its tensors or chunks) and `extra` facts finalize needs."""
        return write_record(
            self.dir,
            i=self.i,
            n=self.n,
            fp=self.fp,
            direction=self.direction,
            files=files,
            digests=digests,
            extra=extra,
            started=self.started,
        )


@contextmanager
def staged(out: str | os.PathLike, share: tuple[int, int], fp: str, direction: Direction) -> Iterator[StagedShare]:
    """Write share (i, n) of the conversion `fp` into a temp folder that becomes its folder in the staging folder
    beside `out` when the block ends without error (an older attempt at the same share is replaced)."""
    i, n = share
    with atomic_dir(begin(out, i, n, fp), overwrite=True) as tmp:
        yield StagedShare(tmp, i, n, fp, direction, now())


def write_record(
    folder: Path,
    *,
    i: int,
    n: int,
    fp: str,
    direction: Direction,
    files: dict,
    digests: dict,
    extra: dict | None = None,
    started: str,
) -> dict:
    record = {
        "format": FORMAT,
        "ckptflow_version": __version__,
        "fingerprint": fp,
        "direction": direction.record,
        "part": i,
        "parts": n,
        "host": socket.gethostname(),
        "started": started,
        "finished": now(),
        "files": files,
        "digests": digests,
        **(extra or {}),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_record(d: Path) -> dict | None:
    try:
        m = json.loads((d / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def collect(out: str | os.PathLike, fp: str, direction: Direction) -> list[Share]:
    """Every share of this conversion, checked: all N present, same fingerprint, files as recorded. Else a one-line
    cause."""
    stage = staging_dir(out)
    if not stage.is_dir():
        raise SharesError(f"{stage}: no parts to finalize (run `ckptflow convert ... --part I/N` for every I first)")
    found: dict[int, dict[int, Path]] = {}
    for d in stage.iterdir():
        m = _SHARE_DIR.match(d.name)
        if m and d.is_dir():
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = d
    if not found:
        raise SharesError(
            f"{stage}: no finished parts (a part still running or killed leaves only a hidden temp folder)"
        )
    if len(found) > 1:
        raise SharesError(
            f"{stage}: parts of different splits ({', '.join(f'N={k}' for k in sorted(found))}); re-run the parts of "
            f"one"
        )
    n, dirs = next(iter(found.items()))
    missing = [i for i in range(n) if i not in dirs]
    if missing:
        raise SharesError(
            f"part(s) {', '.join(f'{i}/{n}' for i in missing)} not finished (in {stage}); run them, then finalize again"
        )
    shares = []
    for i in range(n):
        record = _read_record(dirs[i])
        if record is None:
            raise SharesError(f"part {i}/{n}: {dirs[i] / RECORD} is missing or unreadable; re-run that part")
        if record.get("format") != FORMAT:
            raise SharesError(
                f"part {i}/{n} was written by another ckptflow version ({record.get('format')}, this one reads "
                f"{FORMAT}); re-run it"
            )
        if (
            record.get("fingerprint") != fp
            or record.get("direction") != direction.record
            or record.get("part") != i
            or record.get("parts") != n
        ):
            raise SharesError(
                f"part {i}/{n} is stale: it was written for another source, revision or options than this "
                f"finalize ({record.get('fingerprint', '?')[:19]} != {fp[:19]}); re-run it"
            )
        for rel, f in (record.get("files") or {}).items():
            p = dirs[i] / rel
            if not p.is_file() or p.stat().st_size != f.get("bytes"):
                raise SharesError(f"part {i}/{n}: {rel} is missing or not the size its record says; re-run that part")
        shares.append(Share(i, n, dirs[i], record))
    return shares


class Assembly:
    """The shares' files put into the destination: hard links (no bytes copied, the shares intact until finalize
    succeeds); on file systems without hard links (GCS FUSE) they are moved instead, and moved back by `undo`
    if finalize fails (a finalize killed meanwhile leaves those shares to be re-run: finalize says which).

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


def summary(shares: list[Share]) -> list[dict]:
    """What the manifest records about each share (its `parts` list)."""
    return [
        {
            "part": s.i,
            "host": s.record.get("host"),
            "started": s.record.get("started"),
            "finished": s.record.get("finished"),
            "bytes": s.record.get("bytes"),
            "files": len(s.record.get("files") or {}),
            "digest": share_digest(s.record),
        }
        for s in shares
    ]


def share_digest(record: dict) -> str:
    """One digest of what a share wrote (its files' and tensors' digests)."""
    blob = json.dumps({"files": record.get("files"), "digests": record.get("digests")}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def remove_staging(out: str | os.PathLike) -> None:
    remove_tree(staging_dir(out))
