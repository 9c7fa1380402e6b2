"""Plain file helpers shared by the library: JSON files read and written (atomically), a folder's files walked
and hashed, one file copied while it is hashed, and one digest over a whole folder's files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from converters.errors import CkptflowError
from converters.io import direct_io
from converters.outputs.hashing import file_digests

_CHUNK = 8 << 20


# ------------------------------------------------------------------------------------------------------ JSON


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; CkptflowError naming `what` when it is missing, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CkptflowError(f"{path}: {what} not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CkptflowError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CkptflowError(f"{path}: {what} must be a JSON object")
    return data


def load_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable (then the caller redoes the work)."""
    try:
        return read_json(path, "JSON file")
    except CkptflowError:
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- files and trees


def copy_file(src: Path, dst: Path) -> str:
    """Copy one file (contents, then mode and times) and return the sha256 of what was read, in one pass."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(dst, "wb") as fout:
        for block in direct_io.read_blocks(src, _CHUNK):
            h.update(block)
            fout.write(block)
    shutil.copystat(src, dst)
    return h.hexdigest()


def iter_tree(root: Path, exclude: Iterable[str] = ()) -> Iterator[tuple[str, Path]]:
    """(posix relative path, path) of every regular file under `root`, sorted; symlinks are refused."""
    skip = set(exclude)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            if p.is_symlink():
                raise CkptflowError(f"{p}: symbolic links are not copied (copy the real file into the folder)")
            yield rel, p


def tree_files(root: Path, exclude: Iterable[str] = (), digests: tuple[str, ...] = ("sha256",)) -> dict[str, dict]:
    """{rel: {"size", and a hex digest per name in `digests`}} of every file under `root` (each read once)."""
    return {rel: {"size": p.stat().st_size, **file_digests(p, digests)} for rel, p in iter_tree(root, exclude)}


def digest_of(files: dict[str, dict]) -> str:
    """One sha256 over the sorted (relative path, size, sha256) of every file: equal trees, equal digests."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['size']}\0{files[rel]['sha256']}\n".encode())
    return "sha256:" + h.hexdigest()
