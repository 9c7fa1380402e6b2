"""Atomic output folders, sidecar files and the lineage manifest written beside every conversion."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from converters import __version__
from converters.errors import CkptflowError, OutputExistsError

MANIFEST = "ckptflow-manifest.json"
SIDECAR = Path("ckptflow") / "hf"  # source HF config + tokenizer, kept beside a MaxText checkpoint
TMP_MARK = ".ckptflow-tmp-"

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(out: Path) -> None:
    """Remove temp siblings left by killed runs for the same destination (their process is gone)."""
    prefix = f".{out.name}{TMP_MARK}"
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if p.name.startswith(prefix):
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def check_destination(out: str | os.PathLike, overwrite: bool) -> None:
    """Fail before doing any work when the destination exists and may not be replaced."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{Path(out).absolute()} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp sibling of `out` to write into; move it into place only if the block succeeds.

    A failed run removes its temp folder; a killed one leaves only a hidden `.NAME.ckptflow-tmp-PID-*`
    folder, which the next run for the same destination removes. `out` never holds a partial result.
    """
    check_destination(out, overwrite)
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.ckptflow-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_manifest(folder: Path, *, direction: str, family: str, options: dict, source: dict, digest_files: bool = True) -> dict:
    """`ckptflow-manifest.json`: what was converted, how, and a sha256 of every file written."""
    outputs = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            outputs[rel] = {"bytes": p.stat().st_size, **({"sha256": file_digest(p)} if digest_files else {})}
    manifest = {
        "ckptflow_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "direction": direction,
        "family": family,
        "options": options,
        "source": source,
        "outputs": outputs,
    }
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
