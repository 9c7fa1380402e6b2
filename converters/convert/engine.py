"""The two conversion directions, both driven by a family's plan (see `converters.core.mapping`).

HF -> MaxText: validate every tensor name and shape first, then stream: each MaxText array is a lazy
leaf whose pieces (one HF tensor, one layer of a stack, or a row block) are read, transformed and
written one at a time. MaxText -> HF: the same plan read backwards, each HF tensor read as one slice of
a stored array and appended to its safetensors shard as soon as it is ready.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from converters.io.files import read_json
from converters.io.orbax import HF_SIDECAR, SIDECAR_DIR
from converters.outputs.atomic import atomic_dir, check_destination
from converters.outputs.extras import copy_hf_extras
from converters.outputs.hashing import CONTENT_HASH, FileHasher, chunked_digest, file_sha256
from converters.outputs.manifest import describe_source, write_manifest

from converters.io import buffers

from converters.convert import shares as parts

from converters.io import quantized as quant

from converters.core import registry
from converters.errors import CkptflowError, MappingError
from converters.io.malloc import fix_mmap_threshold
from converters.io.read_ahead import prefetch
from converters.core.mapping import Family, Leaf, Piece
from converters.io.safetensors import (
    PlannedTensor,
    SafetensorsFile,
    SafetensorsFolder,
    ShardWriter,
    iter_row_chunks,
    plan_shards,
    will_need,
    read_tensor,
    save_file,
    shard_names,
    write_index,
)
from converters.core.transforms import run_chain

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
ROW_CHUNK_BYTES = 64 << 20  # large 2-D tensors (embedding, lm_head) are streamed in blocks of about this size
DEFAULT_SHARD_BYTES = 5 << 30
# HF embedding rows a MaxText vocabulary cannot hold (Gemma3), kept beside the checkpoint for export
DROPPED_ROWS = SIDECAR_DIR / "dropped_rows.safetensors"


def _dtype(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CkptflowError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass
class Result:
    out: Path
    family: str
    bytes: int
    tensors: int


# ----------------------------------------------------------------------------------------- HF -> MaxText


def load_hf_config(src: Path, hf_config: str | None = None, model: str | None = None) -> dict:
    if not src.is_dir():
        raise CkptflowError(f"{src}: not a directory (expected an HF model folder with config.json and *.safetensors)")
    if hf_config:
        return read_json(Path(hf_config), "HF config")
    if (src / "config.json").exists():
        return read_json(src / "config.json", "config.json")
    if model:
        return registry.model(model)[1]
    raise CkptflowError(f"{src}: no config.json (pass --model NAME or --hf-config PATH)")


def validate_hf_source(family: type[Family], cfg: dict, plan: list[Leaf], src: SafetensorsFolder) -> None:
    """Every planned tensor present with its shape, and nothing in the folder left unconverted."""
    d = family.dims(cfg)
    wanted = {name: leaf.hf_shape for leaf in plan for _, name in leaf.hf_names()}
    missing = [n for n in wanted if n not in src]
    if missing:
        raise MappingError(f"missing tensors for a {family.name} model: {_listing(missing)}")
    bad = [f"{n} (expected {list(s)}, got {list(src.info(n).shape)})" for n, s in wanted.items() if src.info(n).shape != s]
    if bad:
        raise MappingError(f"shape mismatch against config.json: {_listing(bad, 4)}")
    extra = [n for n in src.tensors if n not in wanted and not family.is_ignored(d, n)]
    if extra:
        raise MappingError(f"unexpected tensors a {family.name} model does not have (wrong config.json?): {_listing(extra)}")


@dataclass
class _Unit:
    """One piece of work of an HF -> MaxText conversion: a region of one MaxText array and how to produce it."""

    index: tuple  # region of the MaxText array
    nbytes: int
    source: tuple  # (source file rank, byte offset): where its HF bytes are, so shares follow the files
    produce: Callable[[], np.ndarray]
    prefetch: Callable[[], None] = lambda: None  # start reading its source bytes (readahead)


def _source_position(src, name: str, files: dict[str, int]) -> tuple[int, int]:
    info = src.info(name) if name in src else None
    path = getattr(info, "path", None)
    return (files.get(path.name, len(files)), getattr(info, "start", 0)) if path is not None else (len(files), 0)


def _hf_units(leaf: Leaf, src: SafetensorsFolder, dtype: np.dtype, files: dict[str, int]) -> tuple[list[_Unit], tuple[int, ...]]:
    """The units that fill one MaxText array, and the block shape (its stored chunking)."""
    r = leaf.rule
    shape = leaf.shape
    if not leaf.row_streamed:  # whole tensors, layer slices, (expert, layer) slices
        nbytes = math.prod(leaf.piece_shape) * dtype.itemsize

        def piece(p: Piece) -> np.ndarray:
            x = src.read(p.hf) if p.row is None else src.read(p.hf, slice(p.row, p.row + 1))[0]
            return r.to_maxtext(x, dtype, leaf.part)

        def ahead(p: Piece) -> None:
            if p.hf in src and hasattr(src.info(p.hf), "path"):
                will_need(src.info(p.hf), None if p.row is None else slice(p.row, p.row + 1))

        units = [_Unit(p.index, nbytes, _source_position(src, p.hf, files), lambda p=p: piece(p), lambda p=p: ahead(p))
                 for p in leaf.pieces()]
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
    # -> 262144) are kept aside by `_save_dropped_rows`; MaxText's vocab padding (Gemma2: 256000 -> 256128) is
    # zeros, in the same block as the last HF rows when they share a chunk (a chunk is written by one piece only).
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
        rows_ahead = (lambda rs=rs: will_need(info, slice(rs.start, min(rs.stop, kept)))) if rs.start < kept else (lambda: None)
        units.append(_Unit(region(rs), (rs.stop - rs.start) * row_bytes, (where[0], at), lambda rs=rs: block(rs), rows_ahead))
    return units, tuple(min(step_rows, n) if a == ax else n for a, n in enumerate(shape))


def _produce(units: list[_Unit]) -> Iterator[tuple[tuple, np.ndarray]]:
    """(region, block) of each unit, the next unit's source already being read by the kernel meanwhile."""
    for k, u in enumerate(units):
        if k == 0:
            u.prefetch()
        if k + 1 < len(units):
            units[k + 1].prefetch()
        yield u.index, u.produce()


def _share(work: list[list[_Unit]], part: tuple[int, int] | None) -> list[list[bool]]:
    """Which units part I of N writes: contiguous runs in source order, balanced by bytes (all of them without a part)."""
    if part is None:
        return [[True] * len(units) for units in work]
    i, n = part
    order = sorted(((u.source, a, k) for a, units in enumerate(work) for k, u in enumerate(units)))
    owners = parts.assign([work[a][k].nbytes for _, a, k in order], n)
    mine = [[False] * len(units) for units in work]
    for (_, a, k), owner in zip(order, owners):
        mine[a][k] = owner == i
    return mine


def with_aliases(family: type[Family], folder: SafetensorsFolder) -> SafetensorsFolder:
    """Tensors some writers name differently, renamed to the names the rules use (`Family.hf_aliases`)."""
    for want, alt in family.hf_aliases:
        names = folder.tensors
        if not any(n.startswith(want) for n in names) and any(n.startswith(alt) for n in names):
            folder.tensors = {(want + n[len(alt):] if n.startswith(alt) else n): info for n, info in names.items()}
    return folder


def hf_source(src: Path, family: type[Family], cfg: dict):
    """An HF folder's tensors as the rules name them: aliases resolved, quantized sources decoded while read."""
    return quant.decoded_source(with_aliases(family, SafetensorsFolder(src)), cfg)


def _dropped_rows(plan: list[Leaf]) -> list[tuple[Leaf, str, int]]:
    """Row-streamed tensors with more HF rows than their MaxText array: (leaf, HF name, rows MaxText keeps)."""
    out = []
    for leaf in plan:
        if leaf.row_streamed and leaf.rule.hf_shape[0] > leaf.shape[leaf.rule.row_axis]:
            out.append((leaf, leaf.hf_name(), leaf.shape[leaf.rule.row_axis]))
    return out


def _save_dropped_rows(plan: list[Leaf], src: SafetensorsFolder, root: Path) -> None:
    """Keep the HF rows MaxText cannot hold, unchanged, in `DROPPED_ROWS` so export can restore them."""
    dropped = {name: src.read(name, slice(kept, leaf.rule.hf_shape[0])) for leaf, name, kept in _dropped_rows(plan)}
    if dropped:
        (root / DROPPED_ROWS).parent.mkdir(parents=True, exist_ok=True)
        save_file(root / DROPPED_ROWS, dropped)


def load_dropped_rows(plan: list[Leaf], root: Path) -> dict[str, np.ndarray]:
    """The rows `_save_dropped_rows` kept, per HF name; a tensor without them gets zero rows (with a warning)."""
    wanted = _dropped_rows(plan)
    if not wanted:
        return {}
    path = root / DROPPED_ROWS
    found = SafetensorsFile(path).tensors if path.is_file() else {}
    out = {}
    for leaf, name, kept in wanted:
        shape = (leaf.rule.hf_shape[0] - kept,) + leaf.rule.hf_shape[1:]
        if name in found and found[name].shape == shape:
            out[name] = read_tensor(found[name])
        else:
            warnings.warn(
                f"{name}: rows {kept}..{leaf.rule.hf_shape[0] - 1} are not in the MaxText checkpoint and {path} does not "
                "have them; they are written as zeros",
                stacklevel=3,
            )
    return out


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def _finish_maxtext(root: Path, src: Path, cfg: dict, hf_config: str | None, plan: list[Leaf], folder, family, options: dict,
                    **digests) -> None:
    """What export needs beside the arrays (HF rows MaxText cannot hold, the source config and tokenizer), then
    the manifest (`digests`: what the writers computed, see `write_manifest`)."""
    _save_dropped_rows(plan, folder, root)
    sidecar = root / HF_SIDECAR
    copied = copy_hf_extras(src, sidecar)
    if hf_config or "config.json" not in copied:  # the config actually used, for the way back
        (sidecar / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # source: + repo, commit sha and file sha256s when `ckptflow download` staged it
    write_manifest(root, direction="hf->maxtext", family=family.name, options=options,
                   source=describe_source(src), **digests)


def _returns_buffers(fn):
    """The buffer pool's spare buffers are let go when a conversion ends, however it ends."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            buffers.POOL.trim()

    return run


@_returns_buffers
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
    `part=(i, n)`: convert only part i's share, as process i of a multi-process save, into the staging folder
    (see `converters.convert.shares`); `finalize`: assemble `out` from the finished parts. `buffer_bytes`: write data each
    worker buffers before committing it (default `orbax_io.TXN_BYTES`)."""
    from converters.io.orbax import TXN_BYTES, LazyArray, WriteProgress, write_checkpoint

    fix_mmap_threshold()
    src = Path(src)
    out_dtype = _dtype(dtype)
    if (part or finalize) and not use_ocdbt:
        raise CkptflowError("--part/--finalize write Orbax's multi-process layout, which needs OCDBT (drop --no-ocdbt)")
    check_destination(out, overwrite)  # parts too: better now than at finalize, hours later
    cfg = load_hf_config(src, hf_config, model)
    family = registry.family_for_config(cfg)
    plan = family.plan(cfg, scan, ("mtp",) if with_mtp else ())
    folder = hf_source(src, family, cfg)  # quantized sources decode while read
    validate_hf_source(family, cfg, plan, folder)
    options = {"scan_layers": scan, "dtype": dtype, "use_ocdbt": use_ocdbt, "use_zarr3": use_zarr3, "compress": compress,
               **({"with_mtp": True} if with_mtp else {})}
    if finalize:
        return _finalize_to_maxtext(src, out, family, cfg, hf_config, plan, folder, options, overwrite)

    files = {p.name: k for k, p in enumerate(sorted({i.path for i in folder.tensors.values() if getattr(i, "path", None)}))}
    work, shapes, dtypes = [], [], []
    for leaf in plan:
        leaf_dtype = leaf.rule.out_dtype(out_dtype)
        units, piece_shape = _hf_units(leaf, folder, leaf_dtype, files)
        work.append(units)
        shapes.append(piece_shape)
        dtypes.append(leaf_dtype)
    mine = _share(work, part)
    flat = {}
    for leaf, units, sel, piece_shape, leaf_dtype in zip(plan, work, mine, shapes, dtypes):
        todo = [u for u, m in zip(units, sel) if m]
        pieces = (lambda todo=todo: _produce(todo)) if todo else None
        flat[leaf.path] = LazyArray(leaf.shape, leaf_dtype, pieces, piece_shape, name=leaf.path)
    total = sum(u.nbytes for units, sel in zip(work, mine) for u, m in zip(units, sel) if m)
    bar = progress(total, len(flat)) if progress else None
    counter = WriteProgress(bar.update if bar is not None else None)
    digests: dict = {}

    def write(root: Path, process_id: int | None = None) -> None:
        write_checkpoint(root, _nest(flat), scan_layers=scan, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                         use_compression=compress, workers=workers, progress=counter, process_id=process_id, digests=digests,
                         txn_bytes=buffer_bytes or TXN_BYTES)
        if bar is not None:
            bar.close()

    if part is not None:
        i, n = part
        fp = parts.fingerprint("hf->maxtext", family.name, options, src, cfg)
        with atomic_dir(parts.begin(out, i, n, fp), overwrite=True) as tmp:
            started = parts.now()
            with FileHasher(tmp) as hasher:
                write(tmp / "ckpt", process_id=i)
            items = tmp / "ckpt" / "0" / "items"
            substore = items / f"ocdbt.process_{i}"
            written = parts.hash_files(tmp, substore, known=hasher.known(tmp)) if substore.is_dir() else {}
            parts.write_marker(tmp, i=i, n=n, fp=fp, direction="hf->maxtext", files=written,
                               digests={k: {json.dumps(list(o)): h for o, h in v.items()} for k, v in digests.items() if v},
                               extra={"bytes": total, "tree_metadata": file_sha256(items / "_METADATA")}, started=started)
        return Result(Path(out), family.name, total, sum(1 for a in flat.values() if a.pieces is not None))

    with atomic_dir(out, overwrite) as tmp:
        with FileHasher(tmp) as hasher:  # OCDBT data files are hashed as soon as tensorstore finishes each
            write(tmp)
        _finish_maxtext(tmp, src, cfg, hf_config, plan, folder, family, options, file_hashes=hasher.known(tmp),
                        tensors={k: (a.shape, np.dtype(a.dtype).name, chunked_digest(digests[k])) for k, a in flat.items()})
    return Result(Path(out), family.name, total, len(flat))


def _finalize_to_maxtext(src: Path, out, family, cfg: dict, hf_config, plan: list[Leaf], folder, options: dict, overwrite: bool) -> Result:
    """Assemble the parts into one checkpoint: part 0's Orbax save (tree metadata, step, its sub-store) plus every
    other part's `ocdbt.process_<i>` sub-store, with the root OCDBT manifest rebuilt over all of them."""
    from converters.io.orbax import merge_parts

    fp = parts.fingerprint("hf->maxtext", family.name, options, src, cfg)
    found = parts.collect(out, fp, "hf->maxtext")
    trees = {p.marker.get("tree_metadata") for p in found}
    if len(trees) != 1:
        raise parts.PartsError("parts disagree on the checkpoint's tree metadata (written by different ckptflow versions?); re-run them")
    chunks: dict[str, dict] = {}
    file_hashes: dict[str, str] = {}
    for p in found:
        for name, entries in p.marker["digests"].items():
            for origin, digest in entries.items():
                chunks.setdefault(name, {})[tuple(json.loads(origin))] = digest
        file_hashes.update({rel.removeprefix("ckpt/"): f[CONTENT_HASH] for rel, f in p.marker["files"].items()})
    missing = [leaf.path for leaf in plan if leaf.path not in chunks]
    if missing:
        raise parts.PartsError(f"no part wrote {_listing(missing)}; re-run the parts")
    with atomic_dir(out, overwrite) as tmp, parts.Assembly() as assembly:
        # part 0's Orbax save (tree metadata, step, its sub-store), without the root index its own save
        # merged: `merge_parts` rebuilds that over every part's sub-store
        assembly.add_tree(found[0].dir / "ckpt", tmp, skip=("0/items/manifest.ocdbt", "0/items/d"))
        items = tmp / "0" / "items"
        for p in found[1:]:
            sub = f"ocdbt.process_{p.i}"
            if (p.dir / "ckpt" / "0" / "items" / sub).is_dir():
                assembly.add_tree(p.dir / "ckpt" / "0" / "items" / sub, items / sub)
        merge_parts(items, use_zarr3=options["use_zarr3"])
        _finish_maxtext(tmp, src, cfg, hf_config, plan, folder, family, options, file_hashes=file_hashes,
                        tensors={leaf.path: (leaf.shape, leaf.rule.out_dtype(_dtype(options["dtype"])).name,
                                             chunked_digest(chunks[leaf.path])) for leaf in plan},
                        extra={"parts": parts.summary(found)})
    parts.remove_staging(out)
    total = sum(int(p.marker.get("bytes") or 0) for p in found)
    return Result(Path(out), family.name, total, len(plan))


# ----------------------------------------------------------------------------------------- MaxText -> HF


def _shape_fits(leaf: Leaf, stored: tuple[int, ...]) -> bool:
    """Equal, or larger only along the vocab axis (training runs pad the vocabulary)."""
    want = leaf.shape
    if stored == want:
        return True
    ax = leaf.rule.row_axis
    return ax is not None and len(stored) == len(want) and all(s == w or (a == ax and s >= w) for a, (s, w) in enumerate(zip(stored, want)))


def choose_plan(family: type[Family], cfg: dict, stored: dict[str, tuple[int, ...]]) -> tuple[bool, list[Leaf]]:
    """Detect scanned vs unscanned from the stored tree and check every array against the plan."""
    try:  # optional parts (DeepSeek's MTP layer) are exported when the checkpoint has them
        optional = [(x,) for x in family.optional_groups(family.dims(cfg))]
    except Exception:  # a bad config: family.plan below reports it
        optional = []
    plans, refused = {}, None
    for ex in [(), *optional]:
        for scan in (True, False):
            try:  # a layout this config cannot have (Qwen3-Next scanned needs a multiple of 4 layers) is not a candidate
                plans[(scan, ex)] = family.plan(cfg, scan, ex)
            except CkptflowError as e:
                refused = refused or e
    if not plans:
        raise refused
    overlap = {key: len({l.path for l in p} & stored.keys()) for key, p in plans.items()}
    key = max(overlap, key=overlap.get)  # ties: the first, i.e. without optional parts
    scan, plan = key[0], plans[key]
    paths = {l.path for l in plan}
    missing = paths - stored.keys()
    if missing:
        raise MappingError(f"checkpoint is missing arrays of a {'scanned' if scan else 'unscanned'} {family.name} model: {_listing(missing)}")
    extra = stored.keys() - paths
    if extra:
        raise MappingError(f"checkpoint has arrays a {family.name} model with this config does not have: {_listing(extra)}")
    bad = [f"{l.path} (expected {list(l.shape)}, got {list(stored[l.path])})" for l in plan if not _shape_fits(l, stored[l.path])]
    if bad:
        raise MappingError(f"shape mismatch between checkpoint and HF config (wrong --model?): {_listing(bad, 4)}")
    return scan, plan


def export_tensors(plan: list[Leaf]) -> list[tuple[Leaf, str, list[Piece] | None]]:
    """(leaf, HF name, its pieces or None when row-streamed) for every HF tensor of the model, each once."""
    out: list = []
    for leaf in plan:
        if leaf.part:
            continue  # a split HF tensor is written once, by part 0 reading all the parts
        if leaf.row_streamed:
            out.append((leaf, leaf.hf_name(), None))
        else:
            out.extend((leaf, name, pieces) for name, pieces in leaf.hf_tensors())
    return out


def _hf_jobs(leaf: Leaf, pieces: list[Piece] | None, dtype: np.dtype, dropped: dict | None = None) -> Iterator[tuple[list, Callable]]:
    """The blocks (whole tensor, expert rows, or row chunks) of one HF tensor, each as the MaxText reads it needs
    ([(array path, index)]) and the function that makes the block from what they return.

    `dropped`: HF rows past the MaxText array's end (see `load_dropped_rows`), appended unchanged; zeros if absent.
    """
    r = leaf.rule
    if pieces is not None:
        for p in pieces:
            def piece(xs, p=p):
                x = r.to_hf(xs, dtype)
                return x if p.row is None else x[None]

            yield [(path, p.index) for path in leaf.parts or (leaf.path,)], piece
        return
    ax, hf_rows = r.row_axis, r.hf_shape[0]
    row_bytes = math.prod(r.hf_shape[1:]) * 4
    kept = min(hf_rows, leaf.shape[ax])
    for rs in iter_row_chunks(kept, row_bytes, ROW_CHUNK_BYTES):
        index = tuple(rs if a == ax else slice(None) for a in range(len(leaf.shape)))
        yield [(leaf.path, index)], lambda xs: run_chain(r.chain, xs[0], dtype, inverse=True)
    if kept < hf_rows:
        rows = (dropped or {}).get(leaf.hf_name())
        yield [], lambda _: rows.astype(dtype) if rows is not None else np.zeros((hf_rows - kept,) + r.hf_shape[1:], dtype)


def _read_ahead(jobs: Iterator[tuple[object, list, Callable]], reader) -> Iterator[tuple[object, np.ndarray]]:
    """(tag, block) of each job, the next job's reads already running in tensorstore while this one is transformed."""
    pending = None
    for tag, reads, make in jobs:
        issued = (tag, [reader.read_async(path, index) for path, index in reads], make)
        if pending is not None:
            yield pending[0], pending[2]([f.result() for f in pending[1]])
        pending = issued
    if pending is not None:
        yield pending[0], pending[2]([f.result() for f in pending[1]])


@_returns_buffers
def maxtext_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    model: str | None = None,
    hf_config: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], object] | None = None,
    part: tuple[int, int] | None = None,
    finalize: bool = False,
) -> Result:
    """Convert a MaxText checkpoint (ours, or a training run's) to an HF safetensors folder at `out`.

    `part=(i, n)`: write only part i's run of shards (balanced by bytes) into the staging folder (see
    `converters.convert.shares`); `finalize`: assemble `out` from the finished parts (index, config, manifest)."""
    from converters.io.orbax import CheckpointReader, find_sidecar_dir

    fix_mmap_threshold()
    out_dtype = _dtype(dtype)
    check_destination(out, overwrite)  # parts too: better now than at finalize, hours later
    reader = CheckpointReader(ckpt)
    sidecar = find_sidecar_dir(ckpt)
    if hf_config:
        cfg = read_json(Path(hf_config), "HF config")
    elif model:
        cfg = registry.model(model)[1]
    elif sidecar is not None:
        cfg = read_json(sidecar / "config.json", "sidecar config.json")
    else:
        raise CkptflowError(f"{reader.root}: no ckptflow sidecar config; pass --model NAME or --hf-config PATH")
    family = registry.family_for_config(cfg)
    cfg = family.config_for_checkpoint(cfg, set(reader.arrays))
    scan, plan = choose_plan(family, cfg, {k: reader.shape(k) for k in reader.arrays})
    options = {"scan_layers": scan, "dtype": dtype, "shard_bytes": shard_bytes}

    tensors = export_tensors(plan)
    planned = [PlannedTensor(name, leaf.hf_shape, leaf.rule.out_dtype(out_dtype)) for leaf, name, _ in tensors]
    shards = plan_shards(planned, shard_bytes)
    names = shard_names(len(shards))
    source = {**describe_source(reader.root), "path": str(reader.items)}

    def finish(tmp: Path, file_hashes: dict[str, str], tensor_hashes: dict[str, str], extra: dict | None = None) -> None:
        """Index, config, generation defaults, tokenizer and manifest beside the written shards (the digests the
        writers took: {shard name: blake3}, {tensor name: blake3})."""
        write_index(tmp, shards, names)
        if sidecar is not None:
            copy_hf_extras(sidecar, tmp, skip=("config.json",))
        export_cfg = family.export_config(cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(export_cfg, indent=2, sort_keys=True) + "\n")
        if not (tmp / "generation_config.json").exists():
            gen = {k: export_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if export_cfg.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tensors = {t.name: (t.shape, t.dtype.name, tensor_hashes[t.name]) for t in planned if t.name in tensor_hashes}
        write_manifest(tmp, direction="maxtext->hf", family=family.name, options=options, source=source,
                       file_hashes=file_hashes, tensors=tensors, extra=extra)

    fp = parts.fingerprint("maxtext->hf", family.name, options, reader.items, cfg) if part or finalize else None
    if finalize:
        found = parts.collect(out, fp, "maxtext->hf")
        file_hashes, tensor_hashes = {}, {}
        for p in found:
            file_hashes.update({rel.removeprefix("shards/"): f[CONTENT_HASH] for rel, f in p.marker["files"].items()})
            tensor_hashes.update(p.marker["digests"])
        absent = [f for f in names if f not in file_hashes]
        if absent:
            raise parts.PartsError(f"no part wrote {_listing(absent)}; re-run the parts")
        with atomic_dir(out, overwrite) as tmp, parts.Assembly() as assembly:
            for p in found:
                assembly.add_tree(p.dir / "shards", tmp)
            finish(tmp, file_hashes, tensor_hashes, extra={"parts": parts.summary(found)})
        parts.remove_staging(out)
        return Result(Path(out), family.name, sum(t.nbytes for t in planned), len(planned))

    mine = [True] * len(shards)
    if part is not None:  # a contiguous run of shards, balanced by bytes
        owners = parts.assign([sum(t.nbytes for t in shard) for shard in shards], part[1])
        mine = [o == part[0] for o in owners]
    wanted = {t.name for shard, m in zip(shards, mine) if m for t in shard}
    todo = [x for x in tensors if x[1] in wanted]
    total = sum(t.nbytes for t in planned if t.name in wanted)
    bar = progress(total, len(wanted)) if progress else None

    # blocks are read (one ahead) and transformed on a background thread while the previous one is written
    dropped = load_dropped_rows(plan, reader.root)
    jobs = ((name, reads, make) for leaf, name, pieces in todo for reads, make in _hf_jobs(leaf, pieces, leaf.rule.out_dtype(out_dtype), dropped))
    blocks = prefetch(_read_ahead(jobs, reader), depth=1)
    file_hashes: dict[str, str] = {}
    tensor_hashes: dict[str, str] = {}

    def write_shards(folder: Path) -> None:
        for shard, fname, m in zip(shards, names, mine):
            if not m:
                continue
            w = ShardWriter(folder / fname, shard)
            try:
                while not w.done:
                    name, block = next(blocks)
                    w.write(name, block)
                    if bar is not None:
                        bar.update(block.nbytes)
            except BaseException:
                w.abort()  # an open file would keep its disk space after the temp folder is removed
                raise
            w.close()
            file_hashes[fname] = w.digest
            tensor_hashes.update(w.tensor_digests)
        if bar is not None:
            bar.close()

    if part is not None:
        i, n = part
        with atomic_dir(parts.begin(out, i, n, fp), overwrite=True) as tmp:
            started = parts.now()
            (tmp / "shards").mkdir()
            write_shards(tmp / "shards")
            files = {f"shards/{f}": {"bytes": (tmp / "shards" / f).stat().st_size, CONTENT_HASH: h} for f, h in file_hashes.items()}
            parts.write_marker(tmp, i=i, n=n, fp=fp, direction="maxtext->hf", files=files, digests=tensor_hashes,
                               extra={"bytes": total}, started=started)
        return Result(Path(out), family.name, total, len(wanted))

    with atomic_dir(out, overwrite) as tmp:
        write_shards(tmp)
        finish(tmp, file_hashes, tensor_hashes)
    return Result(Path(out), family.name, total, len(planned))
