"""HF safetensors -> MaxText (Orbax), driven by a family's plan (see `converters.core.mapping`).

Every tensor name and shape is validated first, then the conversion streams: each MaxText array is a lazy
leaf whose units (one HF tensor, one layer or expert slice of a stack, or a block of rows) are read,
transformed and written one at a time.

Three modes, one function each: `_convert_whole`; `_convert_share`, one process's share of the units
(`shares.assign_by_position`) written as process I of Orbax's multi-process layout; `_finalize_shares`, which
joins the shares' sub-stores into one checkpoint. All three end in `_finish` (sidecar files and manifest).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from converters.convert import shares
from converters.convert.common import ROW_CHUNK_BYTES, Result, dtype_named, listing, returns_buffers
from converters.convert.dropped_rows import save_dropped_rows
from converters.convert.hf_source import hf_source, load_hf_config, validate_hf_source
from converters.core import registry
from converters.core.direction import Direction
from converters.core.mapping import Family, Leaf, Piece
from converters.core.transforms import run_chain
from converters.errors import CkptflowError
from converters.io.malloc import fix_mmap_threshold
from converters.io.orbax import HF_SIDECAR
from converters.io.safetensors import SafetensorsFolder, iter_row_chunks, will_need
from converters.outputs.atomic import atomic_dir, check_destination
from converters.outputs.extras import copy_hf_extras
from converters.outputs.hashing import CONTENT_HASH, FileHasher, chunked_digest, file_sha256
from converters.outputs.manifest import describe_source, write_manifest

DIRECTION = Direction.TO_MAXTEXT


# ----------------------------------------------------------------------------------------- the work


@dataclass
class _Unit:
    """One unit of work: a region of one MaxText array and how to produce it."""

    index: tuple  # region of the MaxText array
    nbytes: int
    source: tuple  # (source file rank, byte offset): where its HF bytes are, so shares follow the files
    produce: Callable[[], np.ndarray]
    will_need: Callable[[], None] = lambda: None  # ask the kernel to start reading its source bytes (fadvise WILLNEED)


@dataclass
class _ArrayWork:
    """One MaxText array: its leaf, the dtype it is stored in, its units, and its block shape (stored chunking)."""

    leaf: Leaf
    dtype: np.dtype
    units: list[_Unit]
    block_shape: tuple[int, ...]


@dataclass
class _Conversion:
    """One HF -> MaxText conversion, as its three modes share it."""

    src: Path
    cfg: dict  # the HF config used
    hf_config: str | None  # the `--hf-config` it came from, if any
    family: type[Family]
    plan: list[Leaf]
    source: SafetensorsFolder  # the tensors as the rules name them (aliases resolved, quantized ones decoded)
    dtype: np.dtype
    options: dict  # as the manifest records them

    def fingerprint(self) -> str:
        return shares.fingerprint(DIRECTION, self.family.name, self.options, self.src, self.cfg)


@dataclass
class _Writing:
    """How this process writes: `write_checkpoint`'s workers and buffer size, and the progress bar factory."""

    workers: int
    buffer_bytes: int | None
    progress: Callable[[int, int], object] | None


def _source_position(src, name: str, files: dict[str, int]) -> tuple[int, int]:
    info = src.info(name) if name in src else None
    path = getattr(info, "path", None)
    return (files.get(path.name, len(files)), getattr(info, "start", 0)) if path is not None else (len(files), 0)


def array_units(
    leaf: Leaf, src: SafetensorsFolder, dtype: np.dtype, files: dict[str, int]
) -> tuple[list[_Unit], tuple[int, ...]]:
    """The units that fill one MaxText array, and the block shape (its stored chunking).

    `files`: source file name -> its rank in source order (where each unit's bytes are)."""
    r = leaf.rule
    shape = leaf.shape
    if r.fill is not None:  # an array only MaxText has: one constant block
        return [
            _Unit((), math.prod(shape) * dtype.itemsize, (len(files), 0), lambda: np.full(shape, r.fill, dtype))
        ], shape
    if not leaf.row_streamed:  # whole tensors, layer slices, (expert, layer) slices
        nbytes = math.prod(leaf.piece_shape) * dtype.itemsize

        def produce(p: Piece) -> np.ndarray:
            x = src.read(p.hf) if p.row is None else src.read(p.hf, slice(p.row, p.row + 1))[0]
            return r.to_maxtext(x, dtype, leaf.split_index)  # which piece of a split HF tensor this array is

        def ahead(p: Piece) -> None:
            if p.hf in src and hasattr(src.info(p.hf), "path"):
                will_need(src.info(p.hf), None if p.row is None else slice(p.row, p.row + 1))

        units = [
            _Unit(p.index, nbytes, _source_position(src, p.hf, files), lambda p=p: produce(p), lambda p=p: ahead(p))
            for p in leaf.pieces()
        ]
        return units, leaf.piece_shape

    name = leaf.hf_name()
    info = src.info(name)
    ax = r.row_axis
    row_bytes = math.prod(shape) // shape[ax] * dtype.itemsize
    step_rows = max(1, ROW_CHUNK_BYTES // max(1, row_bytes))
    where = _source_position(src, name, files)
    units = []

    def region(rs: slice) -> tuple:
        return tuple(rs if a == ax else slice(None) for a in range(len(shape)))

    # Blocks are aligned to the stored chunks over all MaxText rows: HF rows beyond MaxText's vocab (Gemma3: 262208
    # -> 262144) are kept aside by `save_dropped_rows`; MaxText's vocab padding (Gemma2: 256000 -> 256128) is
    # zeros, in the same block as the last HF rows when they share a chunk (a chunk is written by one unit only).
    kept = min(info.shape[0], shape[ax])

    def block(rs: slice) -> np.ndarray:
        real = slice(rs.start, min(rs.stop, kept))
        if real.stop <= real.start:
            return np.zeros(tuple(rs.stop - rs.start if a == ax else n for a, n in enumerate(shape)), dtype)
        x = run_chain(r.chain, src.read(name, real), dtype)
        if real.stop == rs.stop:
            return x
        pad = tuple(rs.stop - real.stop if a == ax else n for a, n in enumerate(shape))
        return np.concatenate([x, np.zeros(pad, dtype)], axis=ax)

    for rs in iter_row_chunks(shape[ax], 1, step_rows):
        at = where[1] + min(rs.start, kept) * info.row_bytes
        rows_ahead = (
            (lambda rs=rs: will_need(info, slice(rs.start, min(rs.stop, kept)))) if rs.start < kept else (lambda: None)
        )
        units.append(
            _Unit(region(rs), (rs.stop - rs.start) * row_bytes, (where[0], at), lambda rs=rs: block(rs), rows_ahead)
        )
    return units, tuple(min(step_rows, n) if a == ax else n for a, n in enumerate(shape))


def _work(conv: _Conversion) -> list[_ArrayWork]:
    """Every MaxText array of the plan with all its units."""
    paths = {i.path for i in conv.source.tensors.values() if getattr(i, "path", None)}
    files = {p.name: k for k, p in enumerate(sorted(paths))}
    work = []
    for leaf in conv.plan:
        dtype = leaf.rule.out_dtype(conv.dtype)
        units, block_shape = array_units(leaf, conv.source, dtype, files)
        work.append(_ArrayWork(leaf, dtype, units, block_shape))
    return work


def _blocks(units: list[_Unit]) -> Iterator[tuple[tuple, np.ndarray]]:
    """(region, block) of each unit, the next unit's source already being read by the kernel meanwhile."""
    for k, u in enumerate(units):
        if k == 0:
            u.will_need()
        if k + 1 < len(units):
            units[k + 1].will_need()
        yield u.index, u.produce()


def _nest(flat: dict[str, object], collections: dict[str, str] | None = None) -> dict:
    """The tree of `{collection: {...}}` (`params` unless `collections` names another for a path)."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree.setdefault((collections or {}).get(path, "params"), {})
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def _write(
    root: Path,
    conv: _Conversion,
    work: list[_ArrayWork],
    todo: list[list[_Unit]],
    writing: _Writing,
    process_id: int | None = None,
) -> dict:
    """Write the units `todo` (per array of `work`; an array without any is left to other processes) as MaxText's
    checkpoint under `root`, as process `process_id` of a multi-process save if given. Returns each array's chunk
    digests ({path: {chunk origin: blake3}})."""
    from converters.io.orbax import (
        TXN_BYTES,
        LazyArray,
        WriteProgress,
        write_checkpoint,
    )

    arrays = {}
    for w, units in zip(work, todo):
        produce = (lambda units=units: _blocks(units)) if units else None
        arrays[w.leaf.path] = LazyArray(w.leaf.shape, w.dtype, produce, w.block_shape, name=w.leaf.path)
    bar = writing.progress(_bytes(todo), len(arrays)) if writing.progress else None
    digests: dict = {}
    o = conv.options
    write_checkpoint(
        root,
        _nest(arrays, {w.leaf.path: w.leaf.rule.collection for w in work}),
        scan_layers=o["scan_layers"],
        use_ocdbt=o["use_ocdbt"],
        use_zarr3=o["use_zarr3"],
        use_compression=o["compress"],
        workers=writing.workers,
        progress=WriteProgress(bar.update if bar is not None else None),
        process_id=process_id,
        digests=digests,
        txn_bytes=writing.buffer_bytes or TXN_BYTES,
    )
    if bar is not None:
        bar.close()
    return digests


def _bytes(todo: list[list[_Unit]]) -> int:
    return sum(u.nbytes for units in todo for u in units)


def _finish(
    root: Path, conv: _Conversion, *, file_hashes: dict[str, str], chunks: dict[str, dict], extra: dict | None = None
) -> None:
    """What export needs beside the arrays (HF rows MaxText cannot hold, the source config and tokenizer), then the
    manifest: `file_hashes` ({file: blake3}) and `chunks` (each array's chunk digests) as the writers took them."""
    save_dropped_rows(conv.plan, conv.source, root)
    sidecar = root / HF_SIDECAR
    copied = copy_hf_extras(conv.src, sidecar)
    if conv.hf_config or "config.json" not in copied:  # the config actually used, for the way back
        (sidecar / "config.json").write_text(json.dumps(conv.cfg, indent=2) + "\n")
    tensors = {
        leaf.path: (leaf.shape, leaf.rule.out_dtype(conv.dtype).name, chunked_digest(chunks[leaf.path]))
        for leaf in conv.plan
    }
    # source: + repo, commit sha and file sha256s when `ckptflow download` staged it
    write_manifest(
        root,
        direction=DIRECTION.record,
        family=conv.family.name,
        options=conv.options,
        source=describe_source(conv.src),
        file_hashes=file_hashes,
        tensors=tensors,
        extra=extra,
    )


# ----------------------------------------------------------------------------------------- the three modes


def _convert_whole(conv: _Conversion, out, overwrite: bool, writing: _Writing) -> Result:
    work = _work(conv)
    todo = [w.units for w in work]
    with atomic_dir(out, overwrite) as tmp:
        with FileHasher(tmp) as hasher:  # OCDBT data files are hashed as soon as tensorstore finishes each
            chunks = _write(tmp, conv, work, todo, writing)
        _finish(tmp, conv, file_hashes=hasher.known(tmp), chunks=chunks)
    return Result(Path(out), conv.family.name, _bytes(todo), len(work))


def _share_of(work: list[_ArrayWork], share: tuple[int, int]) -> list[list[_Unit]]:
    """The units share (i, n) writes, per array: contiguous runs in source order, balanced by bytes."""
    i, n = share
    units = [u for w in work for u in w.units]
    mine = iter(
        [owner == i for owner in shares.assign_by_position([u.source for u in units], [u.nbytes for u in units], n)]
    )
    return [[u for u in w.units if next(mine)] for w in work]


def _convert_share(conv: _Conversion, out, share: tuple[int, int], writing: _Writing) -> Result:
    """Share i of n as process i of a multi-process Orbax save (its `ocdbt.process_<i>` sub-store), in the staging
    folder."""
    i, _ = share
    work = _work(conv)
    todo = _share_of(work, share)
    with shares.staged(out, share, conv.fingerprint(), DIRECTION) as staged:
        with FileHasher(staged.dir) as hasher:
            chunks = _write(staged.dir / "ckpt", conv, work, todo, writing, process_id=i)
        items = staged.dir / "ckpt" / "0" / "items"
        substore = items / f"ocdbt.process_{i}"
        written = shares.hash_files(staged.dir, substore, known=hasher.known(staged.dir)) if substore.is_dir() else {}
        staged.write_record(
            files=written,
            digests=_chunks_to_record(chunks),
            extra={"bytes": _bytes(todo), "tree_metadata": file_sha256(items / "_METADATA")},
        )
    return Result(Path(out), conv.family.name, _bytes(todo), sum(1 for units in todo if units))


def _finalize_shares(conv: _Conversion, out, overwrite: bool) -> Result:
    """Assemble the shares into one checkpoint: share 0's Orbax save (tree metadata, step, its sub-store) plus every
    other share's `ocdbt.process_<i>` sub-store, with the root OCDBT manifest rebuilt over all of them."""
    from converters.io.orbax import merge_shares

    found = shares.collect(out, conv.fingerprint(), DIRECTION)
    if len({s.record.get("tree_metadata") for s in found}) != 1:
        raise shares.SharesError(
            "parts disagree on the checkpoint's tree metadata (written by different ckptflow versions?); re-run them"
        )
    chunks: dict[str, dict] = {}
    file_hashes: dict[str, str] = {}
    for s in found:
        for name, digests in _chunks_from_record(s.record["digests"]).items():
            chunks.setdefault(name, {}).update(digests)
        file_hashes.update({rel.removeprefix("ckpt/"): f[CONTENT_HASH] for rel, f in s.record["files"].items()})
    missing = [leaf.path for leaf in conv.plan if leaf.path not in chunks]
    if missing:
        raise shares.SharesError(f"no part wrote {listing(missing)}; re-run the parts")
    with atomic_dir(out, overwrite) as tmp, shares.Assembly() as assembly:
        # share 0's Orbax save (tree metadata, step, its sub-store), without the root index its own save
        # merged: `merge_shares` rebuilds that over every share's sub-store
        assembly.add_tree(found[0].dir / "ckpt", tmp, skip=("0/items/manifest.ocdbt", "0/items/d"))
        items = tmp / "0" / "items"
        for s in found[1:]:
            sub = f"ocdbt.process_{s.i}"
            if (s.dir / "ckpt" / "0" / "items" / sub).is_dir():
                assembly.add_tree(s.dir / "ckpt" / "0" / "items" / sub, items / sub)
        merge_shares(items, use_zarr3=conv.options["use_zarr3"])
        _finish(tmp, conv, file_hashes=file_hashes, chunks=chunks, extra={"parts": shares.summary(found)})
    shares.remove_staging(out)
    return Result(Path(out), conv.family.name, sum(int(s.record.get("bytes") or 0) for s in found), len(conv.plan))


def _chunks_to_record(chunks: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Chunk digests as a share record holds them (JSON keys: the chunk origin as a JSON list); arrays without any
    left out."""
    return {
        name: {json.dumps(list(origin)): h for origin, h in by_origin.items()}
        for name, by_origin in chunks.items()
        if by_origin
    }


def _chunks_from_record(recorded: dict[str, dict[str, str]]) -> dict[str, dict]:
    return {
        name: {tuple(json.loads(origin)): h for origin, h in by_origin.items()} for name, by_origin in recorded.items()
    }


# ----------------------------------------------------------------------------------------- entry point


def _prepare(
    src: Path, *, scan: bool, dtype: np.dtype, model: str | None, hf_config: str | None, with_mtp: bool, options: dict
) -> _Conversion:
    """The source's config, family and plan, and its tensors checked against the plan (before anything is written)."""
    cfg = load_hf_config(src, hf_config, model)
    family = registry.family_for_config(cfg)
    plan = family.plan(cfg, scan, ("mtp",) if with_mtp else ())
    source = hf_source(src, family, cfg)  # quantized sources decode while read
    validate_hf_source(family, cfg, plan, source)
    return _Conversion(src, cfg, hf_config, family, plan, source, dtype, options)


@returns_buffers
def hf_to_maxtext(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scan: bool = True,
    dtype: str = "bfloat16",
    model: str | None = None,
    hf_config: str | None = None,
    overwrite: bool = False,
    use_ocdbt: bool = True,
    use_zarr3: bool = True,
    compress: bool = False,
    workers: int = 2,
    progress: Callable[[int, int], object] | None = None,
    with_mtp: bool = False,
    part: tuple[int, int] | None = None,
    finalize: bool = False,
    buffer_bytes: int | None = None,
) -> Result:
    """Convert an HF safetensors folder to a MaxText Orbax checkpoint at `out` (`out/0/items`).

    `with_mtp`: also convert the multi-token-prediction layer (DeepSeek-V3: `mtp_block`), otherwise skipped.
    `part=(i, n)`: convert only this process's share, i of n (`--part I/N`), as process i of a multi-process save,
    into the staging folder (see `converters.convert.shares`); `finalize`: assemble `out` from the finished shares.
    `buffer_bytes`: write data each worker buffers before committing it (default `converters.io.orbax.TXN_BYTES`)."""
    fix_mmap_threshold()
    out_dtype = dtype_named(dtype)
    if (part or finalize) and not use_ocdbt:
        raise CkptflowError("--part/--finalize write Orbax's multi-process layout, which needs OCDBT (drop --no-ocdbt)")
    check_destination(out, overwrite)  # shares too: better now than at finalize, hours later
    options = {
        "scan_layers": scan,
        "dtype": dtype,
        "use_ocdbt": use_ocdbt,
        "use_zarr3": use_zarr3,
        "compress": compress,
        **({"with_mtp": True} if with_mtp else {}),
    }
    conv = _prepare(
        Path(src), scan=scan, dtype=out_dtype, model=model, hf_config=hf_config, with_mtp=with_mtp, options=options
    )
    if finalize:
        return _finalize_shares(conv, out, overwrite)
    writing = _Writing(workers, buffer_bytes, progress)
    if part is not None:
        return _convert_share(conv, out, part, writing)
    return _convert_whole(conv, out, overwrite, writing)
