"""Stage a model's files in a local folder, atomically: a local folder, or a Hugging Face repo at one commit.

SOURCE is a local folder (used when it exists, like `from_pretrained` does) or a Hugging Face repo id
(`org/name`). Only the files a conversion needs are taken: the safetensors weights (the shards listed in
`model.safetensors.index.json` when there is one), that index, `config.json`, `generation_config.json` and
the tokenizer / chat-template files. Pickled weights (`*.bin`, `*.pth`, ...) are never fetched, and a source that
only has those is refused. With `fmt="maxtext"`, SOURCE is a local MaxText (Orbax) checkpoint copied whole.

Hub repos: the revision (branch, tag or sha) is resolved to a commit sha first and every file is fetched at
exactly that sha, several at a time. Each file is checked as it lands: LFS files (the weights) by the sha256 the
hub stores, the others by their git blob id; a mismatch deletes the file and fails loudly. Files land in a
hidden sibling `.OUT.ckptflow-partial-<sha12>` that survives an interruption: the next run for the same commit
keeps the files already complete and checked, and fetches only the rest.

OUT appears only complete: files are moved into a temporary sibling that is checked (safetensors headers and
index) and renamed onto OUT (`converters.outputs.atomic.atomic_dir`). `OUT/ckptflow-download.json` records the
source, the resolved revision sha and each file's size and sha256; `ckptflow convert` copies that lineage into
its own manifest. Running again with the same source and revision leaves a complete OUT as it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from converters.errors import CkptflowError, CorruptFileError
from converters.io.files import copy_file, digest_of, iter_tree, load_json, write_json_atomic
from converters.io.safetensors import INDEX_NAME, SINGLE_NAME, SafetensorsFolder
from converters.outputs.atomic import atomic_dir
from converters.outputs.extras import HF_EXTRA_FILES
from converters.outputs.hashing import file_sha256
from converters.outputs.lock import destination_lock
from converters.outputs.manifest import DOWNLOAD_MANIFEST as MANIFEST_NAME

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
PARTIAL_MARK = ".ckptflow-partial-"


# ----------------------------------------------------------------------------------------- file selection


def select_hf_files(names: Iterable[str], read_index) -> list[str]:
    """The files of an HF model repo a conversion needs, from its root-level file names.

    `read_index()` returns the parsed `model.safetensors.index.json`; it is called only when the repo has one.
    """
    root = sorted(n for n in set(names) if "/" not in n)
    if INDEX_NAME in root:
        index = read_index()
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CkptflowError(f"{INDEX_NAME}: not a valid safetensors index (needs a non-empty 'weight_map')")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if not isinstance(s, str) or "/" in s or not s.endswith(".safetensors")]
        if bad:
            raise CkptflowError(f"{INDEX_NAME}: lists shards that are not root-level .safetensors files: {bad[:3]}")
        missing = [s for s in shards if s not in root]
        if missing:
            raise CkptflowError(f"{INDEX_NAME} lists shard files that are missing: {', '.join(missing[:5])}")
        weights = [INDEX_NAME, *shards]
    elif SINGLE_NAME in root:
        weights = [SINGLE_NAME]
    else:
        weights = [n for n in root if n.endswith(".safetensors")]
    if not weights:
        pickles = [n for n in root if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CkptflowError(
                f"only pickled weights found ({', '.join(pickles[:3])}); ckptflow never loads pickles: "
                "convert them to safetensors with a trusted tool first"
            )
        raise CkptflowError("no *.safetensors weights found")
    if "config.json" not in root:
        raise CkptflowError("no config.json found")
    extra = [n for n in HF_EXTRA_FILES if n in root]
    return sorted(set(weights) | set(extra))


def looks_local(source: str) -> bool:
    """Written as a path or file:// URI (decided from the text alone, the same on every machine)."""
    return source.startswith(("file://", "/", "./", "../", "~"))


def is_local_source(source: str) -> bool:
    """A local folder when written as one or when it exists (like `from_pretrained`); otherwise a hub repo id."""
    return looks_local(source) or Path(source).is_dir()


def local_path(source: str) -> Path:
    if source.startswith("file://"):
        source = source[len("file://") :]
    return Path(source).expanduser().resolve()


# --------------------------------------------------------------------------------------------- download


def _complete(out: Path, manifest: dict | None, want: dict) -> bool:
    """True when `out` holds exactly what `want` describes (same source, revision and files)."""
    if not manifest or not out.is_dir():
        return False
    keys = ("source", "kind", "format", "revision")
    if any(manifest.get(k) != want.get(k) for k in keys):
        return False
    have = manifest.get("files") or {}
    if set(have) != set(want["files"]):
        return False
    for rel, meta in want["files"].items():
        old = have[rel]
        for k in ("size", "source_mtime_ns", "sha256"):
            if k in meta and old.get(k) != meta[k]:
                return False
        p = out / rel
        if not p.is_file() or p.stat().st_size != old.get("size"):
            return False
    on_disk = {rel for rel, _ in iter_tree(out, exclude=[MANIFEST_NAME])}
    return on_disk == set(want["files"])


def _check_staged(tmp: Path, fmt: str) -> None:
    """Parse what was staged before it is renamed into place, so OUT never holds a broken copy."""
    if fmt == "hf":
        SafetensorsFolder(tmp)  # headers, duplicate tensors, index <-> shard consistency
    else:
        from converters.io.orbax import find_items_dir

        find_items_dir(tmp)


def _local_plan(src: Path, fmt: str) -> dict[str, dict]:
    if not src.is_dir():
        raise CkptflowError(f"{src}: no such folder")
    if fmt == "maxtext":
        names = [rel for rel, _ in iter_tree(src)]
        if not any(n.endswith("_METADATA") for n in names):
            raise CkptflowError(f"{src}: not an Orbax/MaxText checkpoint (no _METADATA file in it)")
    else:
        names = select_hf_files(
            (rel for rel, _ in iter_tree(src, exclude=[MANIFEST_NAME])),
            lambda: load_json(src / INDEX_NAME),
        )
    plan = {}
    for rel in names:
        st = (src / rel).stat()
        plan[rel] = {"size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
    return plan


def download_local(source: str, out: Path, fmt: str) -> tuple[dict, bool]:
    src = local_path(source)
    if out == src or src in out.parents:
        raise CkptflowError(f"{out}: the output folder must not be the source folder or inside it")
    want = {"source": src.as_uri(), "kind": "local", "format": fmt, "revision": None, "files": _local_plan(src, fmt)}
    with destination_lock(out):  # a concurrent download of the same OUT waits, then finds it complete
        if _complete(out, load_json(out / MANIFEST_NAME), want):
            return load_json(out / MANIFEST_NAME), False
        with atomic_dir(out, overwrite=True) as tmp:
            for rel, meta in want["files"].items():
                meta["sha256"] = copy_file(src / rel, tmp / rel)
                if (tmp / rel).stat().st_size != meta["size"]:
                    raise CkptflowError(f"{src / rel}: changed while it was being copied")
            _check_staged(tmp, fmt)
            manifest = {**want, "digest": digest_of(want["files"])}
            write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest, True


def partial_dir(out: Path, sha: str) -> Path:
    """Where a hub download for `out` at commit `sha` lands until complete (kept across interruptions)."""
    return out.parent / f".{out.name}{PARTIAL_MARK}{sha[:12]}"


def _drop_other_partials(out: Path, keep: Path) -> None:
    prefix = f".{out.name}{PARTIAL_MARK}"
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            if p.name.startswith(prefix) and p != keep:
                shutil.rmtree(p, ignore_errors=True)


def _forget(staging: Path, name: str) -> None:
    """Remove a downloaded file and the client's record of it, so the next run fetches it again."""
    (staging / name).unlink(missing_ok=True)
    for meta in (staging / ".cache" / "huggingface" / "download").glob(f"{name}.*"):
        meta.unlink(missing_ok=True)


def _part_record(staging: Path, i: int, n: int) -> Path:
    return staging / f".ckptflow-part-{i:05d}-of-{n:05d}.json"


def _weights_of_part(names: list[str], snap, i: int, n: int) -> list[str]:
    """Part i's contiguous run of the weight files (in name order), balanced by bytes; small files are left to
    `--finalize`."""
    from converters.convert.shares import assign

    weights = [x for x in names if x.endswith(".safetensors")]
    owners = assign([snap.files[x].size or 1 for x in weights], n)
    return [x for x, o in zip(weights, owners) if o == i]


def download_hub(
    repo_id: str,
    revision: str | None,
    out: Path,
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    finalize: bool = False,
) -> tuple[dict, bool]:
    """Fetch the repo at one commit into `out`. `part=(i, n)`: fetch only part i's share of the weight files into
    the commit's staging folder (shared by the parts) and record them; `finalize`: check every part's files are
    there, fetch the small rest and publish `out` as a whole download does."""
    from converters.remote import hub

    if not hub.is_repo_id(repo_id):
        raise CkptflowError(f"{repo_id!r}: not a local folder and not a Hugging Face repo id (org/name)")
    snap = hub.snapshot(repo_id, revision)  # the commit sha first: everything below is fetched at exactly it
    staging = partial_dir(out, snap.sha)

    def read_index():
        hub.download_files(snap, [INDEX_NAME], staging)
        return load_json(staging / INDEX_NAME)

    checked: dict[str, dict] = {}

    def check(name: str, path: Path) -> None:
        sha256 = file_sha256(path)
        remote = snap.files[name]
        problem = hub.check_file(path, remote, sha256)
        if problem:
            _forget(staging, name)
            raise CorruptFileError(
                f"hf://{repo_id}@{snap.sha}: {name} does not match the hub's metadata ({problem}); the file was "
                "deleted: run again to fetch it anew (if it fails again, a proxy or mirror serves a corrupt copy)"
            )
        checked[name] = {
            "size": path.stat().st_size,
            "sha256": sha256,
            "verified": "sha256" if remote.sha256 else "git-oid",
        }

    if part is not None:  # no destination lock: the parts run at once, each fetching other files
        i, n = part
        staging.mkdir(parents=True, exist_ok=True)
        mine = _weights_of_part(select_hf_files(snap.files, read_index), snap, i, n)
        hub.download_files(snap, mine, staging, workers=workers or hub.DOWNLOAD_WORKERS, on_file=check)
        record = {"source": f"hf://{repo_id}", "revision": snap.sha, "part": i, "parts": n, "files": checked}
        write_json_atomic(_part_record(staging, i, n), record)
        return record, bool(mine)

    with destination_lock(out):  # a concurrent download of the same OUT waits, then finds it complete
        manifest = load_json(out / MANIFEST_NAME)
        names = None
        if manifest and manifest.get("revision") == snap.sha and manifest.get("source") == f"hf://{repo_id}":
            names = sorted(manifest.get("files") or {})  # same commit: same selection (no need to re-read the index)
        if names is None or any(n not in snap.files for n in names):
            if not finalize:  # a split download's staging is the parts' work: kept
                _drop_other_partials(out, staging)
            names = select_hf_files(snap.files, read_index)
        want_files = {}
        for n in names:
            r = snap.files[n]
            want_files[n] = {
                **({"size": r.size} if r.size is not None else {}),
                **({"sha256": r.sha256} if r.sha256 else {}),
            }
        want = {"source": f"hf://{repo_id}", "kind": "hub", "format": "hf", "revision": snap.sha, "files": want_files}
        if _complete(out, manifest, want):
            shutil.rmtree(staging, ignore_errors=True)
            return manifest, False
        if finalize:
            checked.update(_parts_fetched(staging, names, snap, repo_id))
        else:
            _drop_other_partials(out, staging)
        staging.mkdir(parents=True, exist_ok=True)

        rest = [x for x in names if x not in checked]
        hub.download_files(snap, rest, staging, workers=workers or hub.DOWNLOAD_WORKERS, on_file=check)
        with atomic_dir(out, overwrite=True) as tmp:
            for n in names:
                (tmp / n).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / n, tmp / n)
            _check_staged(tmp, "hf")
            files = {n: checked[n] for n in names}
            manifest = {**want, "files": files, "digest": digest_of(files)}
            write_json_atomic(tmp / MANIFEST_NAME, manifest)
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, True


def _parts_fetched(staging: Path, names: list[str], snap, repo_id: str) -> dict[str, dict]:
    """The weight files the parts of a split download fetched and checked; refuses a missing or damaged part."""
    records = sorted(staging.glob(".ckptflow-part-*-of-*.json")) if staging.is_dir() else []
    found = [
        r
        for r in (load_json(p) for p in records)
        if r and r.get("revision") == snap.sha and r.get("source") == f"hf://{repo_id}"
    ]
    if not found:
        raise CkptflowError(
            f"hf://{repo_id}@{snap.sha[:12]}: no finished download parts in {staging}; run "
            "`ckptflow download ... --part I/N` for every I first"
        )
    n = found[0].get("parts")
    done = {r.get("part") for r in found if r.get("parts") == n}
    missing = [i for i in range(n) if i not in done]
    if missing:
        raise CkptflowError(
            f"download part(s) {', '.join(f'{i}/{n}' for i in missing)} not finished; run them, then finalize again"
        )
    fetched: dict[str, dict] = {}
    for r in found:
        fetched.update(r.get("files") or {})
    for i in range(n):
        for name in _weights_of_part(names, snap, i, n):
            meta, p = fetched.get(name), staging / name
            if not meta or not p.is_file() or p.stat().st_size != meta.get("size"):
                raise CkptflowError(
                    f"download part {i}/{n}: {name} is missing or changed since it was fetched; run that part again"
                )
    return {k: v for k, v in fetched.items() if k in names}


def download(
    source: str,
    out: str | os.PathLike,
    revision: str | None = None,
    fmt: str = "hf",
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    finalize: bool = False,
) -> tuple[dict, bool]:
    """Stage `source` in `out`; returns (the download manifest, whether anything was copied).

    A hub download can be split: `part=(i, n)` fetches part i's share of the weights, `finalize` assembles `out`.
    A local folder has nothing to split: its parts do nothing and `finalize` copies it as a plain run does."""
    out = Path(out).expanduser().absolute()
    if is_local_source(source):
        if revision:
            raise CkptflowError(f"{source}: --revision applies to hub repos only, not to a local folder")
        if part is not None:
            return {"source": local_path(source).as_uri(), "part": part[0], "parts": part[1], "files": {}}, False
        return download_local(source, out, fmt)
    if fmt != "hf":
        raise CkptflowError(
            f"{source}: --format {fmt} needs a local folder (remote MaxText checkpoints are not supported yet)"
        )
    return download_hub(source, revision, out, workers, part=part, finalize=finalize)
