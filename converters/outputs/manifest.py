"""The lineage manifest written beside every conversion (`ckptflow-manifest.json`): what was converted, from
where, how, and the size and BLAKE3 of every file written; the output digest (one digest of what the checkpoint
holds, equal across re-runs); checking a folder against its manifest; adding verify metrics to it."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import uuid
from pathlib import Path

from converters import __version__
from converters.errors import CkptflowError
from converters.io import direct_io
from converters.io.files import read_json
from converters.outputs.hashing import (
    CONTENT_HASH,
    array_bytes,
    chunked_digest,
    content_hasher,
    file_blake3,
    file_digests,
)

MANIFEST = "ckptflow-manifest.json"
DOWNLOAD_MANIFEST = "ckptflow-download.json"  # written by `ckptflow download` into the folder it stages


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
    if (
        record
        and files
        and all(
            (src / rel).is_file() and (src / rel).stat().st_size == (m or {}).get("size") for rel, m in files.items()
        )
    ):
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

        # shape and dtype open the array: only asked for when the writer did not say (see `compute_output_digest`)
        items.append((key, lambda key=key: reader.shape(key), lambda key=key: reader.dtype(key), digest))
    step = reader.items.parent.relative_to(folder).as_posix() if folder in reader.items.parents else None
    return items, set(), (step,) if step else ()


def compute_output_digest(
    folder: str | os.PathLike,
    file_hashes: dict[str, str] | None = None,
    tensors: dict[str, tuple[tuple[int, ...], str, str]] | None = None,
) -> str:
    """The manifest's `output_digest`, computed: a digest of what a checkpoint holds, equal for equal content
    across runs (Orbax file bytes are not: OCDBT file names, timestamps). sha256 over every tensor's name, shape,
    dtype and digest (see `_tensor_sources`) in name order, then over the path and BLAKE3 of every other file
    (configs, tokenizer, sidecars) except the manifest and the Orbax step folder (its `_CHECKPOINT_METADATA`
    holds a time stamp).

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


def check_outputs(
    folder: str | os.PathLike, manifest: dict | None = None, files: dict[str, dict] | None = None
) -> list[str]:
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


def write_manifest(
    folder: Path,
    *,
    direction: str,
    family: str,
    options: dict,
    source: dict,
    digest_files: bool = True,
    file_hashes: dict[str, str] | None = None,
    tensors: dict[str, tuple] | None = None,
    extra: dict | None = None,
) -> dict:
    """`ckptflow-manifest.json`: what was converted, how, and the size and BLAKE3 of every file written.

    Also `output_digest` (see `compute_output_digest`), the digest a re-run of the same conversion reproduces.
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
            content = pool.submit(compute_output_digest, folder, known, tensors)
            digests = list(pool.map(digest, files))
            content_digest = content.result()
    outputs = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, **({CONTENT_HASH: d} if d else {})}
        for p, d in zip(files, digests)
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
