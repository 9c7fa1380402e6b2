"""MaxText (Orbax) -> HF safetensors: a family's plan (see `converters.core.mapping`) read backwards.

Each HF tensor is read as slices of stored arrays, transformed, and appended to its safetensors shard as soon
as it is ready; the shards are planned up front, so every tensor's place is known before anything is read.

Three modes, one function each: `_convert_whole`; `_convert_share`, one process's share (a contiguous run of
whole shards, balanced by bytes) in the staging folder; `_finalize_shares`, which puts the shares' shards
together. The whole export and finalize end in `_finish` (index, config, tokenizer, manifest).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from converters.convert import shares
from converters.convert.common import ROW_CHUNK_BYTES, Result, dtype_named, listing, returns_buffers
from converters.convert.dropped_rows import load_dropped_rows
from converters.core import registry
from converters.core.direction import Direction
from converters.core.mapping import Family, Leaf, Piece
from converters.core.transforms import Fusion, run_chain
from converters.errors import CkptflowError, MappingError
from converters.io.files import read_json
from converters.io.malloc import fix_mmap_threshold
from converters.io.read_ahead import read_ahead
from converters.io.safetensors import PlannedTensor, ShardWriter, iter_row_chunks, plan_shards, shard_names, write_index
from converters.outputs.atomic import atomic_dir, check_destination
from converters.outputs.extras import copy_hf_extras
from converters.outputs.hashing import CONTENT_HASH
from converters.outputs.manifest import describe_source, write_manifest

DIRECTION = Direction.TO_HF
DEFAULT_SHARD_BYTES = 5 << 30


# ----------------------------------------------------------------------------------------- the plan


def _shape_fits(leaf: Leaf, stored: tuple[int, ...]) -> bool:
    """Equal, or larger only along the vocab axis (training runs pad the vocabulary)."""
    want = leaf.shape
    if stored == want:
        return True
    ax = leaf.rule.row_axis
    return (
        ax is not None
        and len(stored) == len(want)
        and all(s == w or (a == ax and s >= w) for a, (s, w) in enumerate(zip(stored, want)))
    )


def choose_plan(family: type[Family], cfg: dict, stored: dict[str, tuple[int, ...]]) -> tuple[bool, list[Leaf]]:
    """Detect scanned vs unscanned from the stored tree and check every array against the plan."""
    try:  # optional groups (DeepSeek's MTP layer) are exported when the checkpoint has them
        d = family.dims(cfg)
        optional, legacy = [(x,) for x in family.optional_groups(d)], list(family.legacy_layouts(d))
    except Exception:  # a bad config: family.plan below reports it
        optional, legacy = [], []
    plans, refused = {}, None
    # an older writer's scanned layout (Family.legacy_layouts) is a candidate after the current ones (ties: current)
    for ex in [(), *optional]:
        for scan, old in [(True, None), (False, None), *((True, name) for name in legacy)]:
            # a layout this config cannot have (Qwen3-Next scanned needs a multiple of 4 layers) is not a candidate
            try:
                plans[(scan, ex, old)] = family.plan(cfg, scan, ex, legacy=old)
            except CkptflowError as e:
                refused = refused or e
    if not plans:
        raise refused
    overlap = {key: len({l.path for l in p} & stored.keys()) for key, p in plans.items()}
    key = max(overlap, key=overlap.get)  # ties: the first, i.e. without optional groups
    scan, plan = key[0], plans[key]
    paths = {l.path for l in plan}
    missing = paths - stored.keys()
    if missing:
        raise MappingError(
            f"checkpoint is missing arrays of a {'scanned' if scan else 'unscanned'} {family.name} model: "
            f"{listing(missing)}"
        )
    extra = stored.keys() - paths
    if extra:
        raise MappingError(
            f"checkpoint has arrays a {family.name} model with this config does not have: {listing(extra)}"
        )
    bad = [
        f"{l.path} (expected {list(l.shape)}, got {list(stored[l.path])})"
        for l in plan
        if not _shape_fits(l, stored[l.path])
    ]
    if bad:
        raise MappingError(f"shape mismatch between checkpoint and HF config (wrong --model?): {listing(bad, 4)}")
    return scan, plan


def check_fills(reader, plan: list[Leaf]) -> None:
    """Arrays only MaxText has (`Rule.fill`) must still hold their import value: HF has no place for anything else."""
    for leaf in plan:
        if leaf.rule.fill is not None:
            x = reader.read(leaf.path)
            if not np.all(x == leaf.rule.fill):
                raise MappingError(
                    f"{leaf.path} holds values other than {leaf.rule.fill} (changed by training?): the HF model has "
                    "no such weight, so exporting would lose them"
                )


def export_tensors(plan: list[Leaf]) -> list[tuple[Leaf, str, list[Piece] | None]]:
    """(leaf, HF name, its pieces or None when row-streamed) for every HF tensor of the model, each once."""
    out: list = []
    for leaf in plan:
        if leaf.split_index:
            continue  # a split HF tensor is written once, by the leaf of its first piece reading all of them
        if leaf.row_streamed:
            out.append((leaf, leaf.hf_name(), None))
        else:
            out.extend((leaf, name, pieces) for name, pieces in leaf.hf_tensors())
    return out


def unfused(tensors: list, fusions: list) -> list:
    """`export_tensors` with each fused tensor (`Family.hf_fusions`) written as its parts: (leaf, HF name, pieces,
    (fusion, part index) or None)."""
    by_name = {f.name: f for f in fusions if isinstance(f, Fusion)}  # `Slices` views are written as the rules name them
    out = []
    for leaf, name, pieces in tensors:
        f = by_name.get(name)
        if f is None:
            out.append((leaf, name, pieces, None))
        else:
            out.extend((leaf, part, pieces, (f, k)) for k, (part, _) in enumerate(f.parts))
    return out


# ----------------------------------------------------------------------------------------- reading and writing


def _tensor_blocks(
    leaf: Leaf, pieces: list[Piece] | None, dtype: np.dtype, dropped: dict | None = None
) -> Iterator[tuple[list, Callable]]:
    """The blocks (whole tensor, expert rows, or row chunks) of one HF tensor, each as the MaxText reads it needs
    ([(array path, index)]) and the function that makes the block from what they return.

    `dropped`: HF rows past the MaxText array's end (see `load_dropped_rows`), appended unchanged; zeros if absent.
    """
    r = leaf.rule
    if pieces is not None:
        for p in pieces:

            def block(xs, p=p):
                x = r.to_hf(xs, dtype)
                return x if p.row is None else x[None]

            # a split HF tensor is read from every array it was cut into (`leaf.split_paths`), joined by `to_hf`
            yield [(path, p.index) for path in leaf.split_paths or (leaf.path,)], block
        return
    ax, hf_rows = r.row_axis, r.hf_shape[0]
    row_bytes = math.prod(r.hf_shape[1:]) * 4
    kept = min(hf_rows, leaf.shape[ax])
    for rs in iter_row_chunks(kept, row_bytes, ROW_CHUNK_BYTES):
        index = tuple(rs if a == ax else slice(None) for a in range(len(leaf.shape)))
        yield [(leaf.path, index)], lambda xs: run_chain(r.chain, xs[0], dtype, inverse=True)
    if kept < hf_rows:
        rows = (dropped or {}).get(leaf.hf_name())
        yield (
            [],
            lambda _: rows.astype(dtype) if rows is not None else np.zeros((hf_rows - kept,) + r.hf_shape[1:], dtype),
        )


def _pipelined_reads(jobs: Iterator[tuple[object, list, Callable]], reader) -> Iterator[tuple[object, np.ndarray]]:
    """(tag, block) of each job, the next job's reads already running in tensorstore while this one is transformed."""
    pending = None
    for tag, reads, make in jobs:
        issued = (tag, [reader.read_async(path, index) for path, index in reads], make)
        if pending is not None:
            yield pending[0], pending[2]([f.result() for f in pending[1]])
        pending = issued
    if pending is not None:
        yield pending[0], pending[2]([f.result() for f in pending[1]])


@dataclass
class _Export:
    """One MaxText -> HF export, as its three modes share it."""

    reader: object  # converters.io.orbax.CheckpointReader
    sidecar: Path | None  # the checkpoint's ckptflow/hf folder (config, tokenizer), if any
    cfg: dict
    family: type[Family]
    plan: list[Leaf]
    dtype_name: str
    dtype: np.dtype
    options: dict  # as the manifest records them
    tensors: list  # unfused(export_tensors(plan), ...)
    planned: list[PlannedTensor]  # every HF tensor as written, in order
    shards: list[list[PlannedTensor]]
    names: list[str]  # the shards' file names

    def fingerprint(self) -> str:
        return shares.fingerprint(DIRECTION, self.family.name, self.options, self.reader.items, self.cfg)


@dataclass
class _Written:
    """What `_write_shards` wrote: the shards' and tensors' digests, the bytes and the number of tensors."""

    files: dict[str, str] = field(default_factory=dict)  # shard file name -> blake3
    tensors: dict[str, str] = field(default_factory=dict)  # HF tensor name -> blake3
    bytes: int = 0
    count: int = 0


def _write_shards(folder: Path, exp: _Export, mine: list[bool], progress) -> _Written:
    """Write the shards `mine` marks into `folder`. Blocks are read (one ahead) and transformed on a background
    thread while the previous one is written."""
    wanted = {t.name for shard, m in zip(exp.shards, mine) if m for t in shard}
    todo = [x for x in exp.tensors if x[1] in wanted]
    written = _Written(bytes=sum(t.nbytes for t in exp.planned if t.name in wanted), count=len(wanted))
    bar = progress(written.bytes, written.count) if progress else None
    dropped = load_dropped_rows(exp.plan, exp.reader.root)
    jobs = (
        (name, reads, make if part is None else (lambda xs, make=make, part=part: part[0].take(make(xs), part[1])))
        for leaf, name, pieces, part in todo
        for reads, make in _tensor_blocks(leaf, pieces, leaf.rule.hf_out_dtype(exp.dtype), dropped)
    )
    blocks = read_ahead(_pipelined_reads(jobs, exp.reader), depth=1)
    for shard, fname, m in zip(exp.shards, exp.names, mine):
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
        written.files[fname] = w.digest
        written.tensors.update(w.tensor_digests)
    if bar is not None:
        bar.close()
    return written


def _finish(
    tmp: Path, exp: _Export, file_hashes: dict[str, str], tensor_hashes: dict[str, str], extra: dict | None = None
) -> None:
    """Index, config, generation defaults, tokenizer and manifest beside the written shards (the digests the
    writers took: {shard name: blake3}, {tensor name: blake3})."""
    write_index(tmp, exp.shards, exp.names)
    if exp.sidecar is not None:
        copy_hf_extras(exp.sidecar, tmp, skip=("config.json",))
    export_cfg = exp.family.export_config(exp.cfg, exp.dtype_name)
    (tmp / "config.json").write_text(json.dumps(export_cfg, indent=2, sort_keys=True) + "\n")
    if not (tmp / "generation_config.json").exists():
        gen = {
            k: export_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if export_cfg.get(k) is not None
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tensors = {t.name: (t.shape, t.dtype.name, tensor_hashes[t.name]) for t in exp.planned if t.name in tensor_hashes}
    source = {**describe_source(exp.reader.root), "path": str(exp.reader.items)}
    write_manifest(
        tmp,
        direction=DIRECTION.record,
        family=exp.family.name,
        options=exp.options,
        source=source,
        file_hashes=file_hashes,
        tensors=tensors,
        extra=extra,
    )


# ----------------------------------------------------------------------------------------- the three modes


def _convert_whole(exp: _Export, out, overwrite: bool, progress) -> Result:
    with atomic_dir(out, overwrite) as tmp:
        written = _write_shards(tmp, exp, [True] * len(exp.shards), progress)
        _finish(tmp, exp, written.files, written.tensors)
    return Result(Path(out), exp.family.name, written.bytes, len(exp.planned))


def _convert_share(exp: _Export, out, share: tuple[int, int], progress) -> Result:
    """Share i of n: a contiguous run of whole shards, balanced by bytes, into the staging folder."""
    i, n = share
    mine = [owner == i for owner in shares.assign([sum(t.nbytes for t in shard) for shard in exp.shards], n)]
    with shares.staged(out, share, exp.fingerprint(), DIRECTION) as staged:
        folder = staged.dir / "shards"
        folder.mkdir()
        written = _write_shards(folder, exp, mine, progress)
        files = {
            f"shards/{f}": {"bytes": (folder / f).stat().st_size, CONTENT_HASH: h} for f, h in written.files.items()
        }
        staged.write_record(files=files, digests=written.tensors, extra={"bytes": written.bytes})
    return Result(Path(out), exp.family.name, written.bytes, written.count)


def _finalize_shares(exp: _Export, out, overwrite: bool) -> Result:
    """Every share's shards into `out`, then the index, config and manifest over all of them."""
    found = shares.collect(out, exp.fingerprint(), DIRECTION)
    file_hashes, tensor_hashes = {}, {}
    for s in found:
        file_hashes.update({rel.removeprefix("shards/"): f[CONTENT_HASH] for rel, f in s.record["files"].items()})
        tensor_hashes.update(s.record["digests"])
    absent = [f for f in exp.names if f not in file_hashes]
    if absent:
        raise shares.SharesError(f"no part wrote {listing(absent)}; re-run the parts")
    with atomic_dir(out, overwrite) as tmp, shares.Assembly() as assembly:
        for s in found:
            assembly.add_tree(s.dir / "shards", tmp)
        _finish(tmp, exp, file_hashes, tensor_hashes, extra={"parts": shares.summary(found)})
    shares.remove_staging(out)
    return Result(Path(out), exp.family.name, sum(t.nbytes for t in exp.planned), len(exp.planned))


# ----------------------------------------------------------------------------------------- entry point


def _prepare(
    ckpt, *, dtype_name: str, dtype: np.dtype, model: str | None, hf_config: str | None, shard_bytes: int
) -> _Export:
    """The checkpoint's config (`hf_config`, else `model`'s, else its sidecar's), family and plan, checked against
    the stored arrays, and the shards the HF tensors go to."""
    from converters.io.orbax import CheckpointReader, find_sidecar_dir

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
    check_fills(reader, plan)
    options = {"scan_layers": scan, "dtype": dtype_name, "shard_bytes": shard_bytes}
    tensors = unfused(export_tensors(plan), family.hf_fusions(family.dims(cfg)))
    planned = [
        PlannedTensor(name, leaf.hf_shape if part is None else part[0].parts[part[1]][1], leaf.rule.hf_out_dtype(dtype))
        for leaf, name, _, part in tensors
    ]
    shards = plan_shards(planned, shard_bytes)
    return _Export(
        reader,
        sidecar,
        cfg,
        family,
        plan,
        dtype_name,
        dtype,
        options,
        tensors,
        planned,
        shards,
        shard_names(len(shards)),
    )


@returns_buffers
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

    `part=(i, n)`: write only this process's share, i of n (`--part I/N`: a run of shards balanced by bytes), into
    the staging folder (see `converters.convert.shares`); `finalize`: assemble `out` from the finished shares
    (index, config, manifest)."""
    fix_mmap_threshold()
    out_dtype = dtype_named(dtype)
    check_destination(out, overwrite)  # shares too: better now than at finalize, hours later
    exp = _prepare(ckpt, dtype_name=dtype, dtype=out_dtype, model=model, hf_config=hf_config, shard_bytes=shard_bytes)
    if finalize:
        return _finalize_shares(exp, out, overwrite)
    if part is not None:
        return _convert_share(exp, out, part, progress)
    return _convert_whole(exp, out, overwrite, progress)
