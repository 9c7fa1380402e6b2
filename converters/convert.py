"""The two conversion directions, both driven by a family's plan (see `converters.mapping`).

HF -> MaxText: validate every tensor name and shape first, then stream: each MaxText array is a lazy
leaf whose pieces (one HF tensor, one layer of a stack, or a row block) are read, transformed and
written one at a time. MaxText -> HF: the same plan read backwards, each HF tensor read as one slice of
a stored array and appended to its safetensors shard as soon as it is ready.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from converters import outputs, quant, registry
from converters.errors import CkptflowError, MappingError
from converters.pipeline import prefetch
from converters.mapping import Family, Leaf, Piece
from converters.safetensors_io import (
    PlannedTensor,
    SafetensorsFile,
    SafetensorsFolder,
    ShardWriter,
    iter_row_chunks,
    plan_shards,
    read_tensor,
    save_file,
    shard_names,
    write_index,
)
from converters.transforms import run_chain

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
ROW_CHUNK_BYTES = 64 << 20  # large 2-D tensors (embedding, lm_head) are streamed in blocks of about this size
DEFAULT_SHARD_BYTES = 5 << 30
# HF embedding rows a MaxText vocabulary cannot hold (Gemma3), kept beside the checkpoint for export
DROPPED_ROWS = Path("ckptflow") / "dropped_rows.safetensors"


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
        return outputs.read_json(Path(hf_config), "HF config")
    if (src / "config.json").exists():
        return outputs.read_json(src / "config.json", "config.json")
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


def _hf_pieces(leaf: Leaf, src: SafetensorsFolder, dtype: np.dtype) -> tuple[Callable[[], Iterator], tuple[int, ...]]:
    """The generator of `(index, block)` that fills one MaxText array, and the block shape (chunking)."""
    r = leaf.rule
    shape = leaf.shape
    if not leaf.row_streamed:  # whole tensors, layer slices, (expert, layer) slices
        pieces = leaf.pieces()

        def each():
            for p in pieces:
                x = src.read(p.hf) if p.row is None else src.read(p.hf, slice(p.row, p.row + 1))[0]
                yield p.index, r.to_maxtext(x, dtype, leaf.part)

        return each, leaf.piece_shape

    name = leaf.hf_name()
    info = src.info(name)
    ax = r.row_axis
    step_rows = max(1, ROW_CHUNK_BYTES // max(1, math.prod(shape) // shape[ax] * dtype.itemsize))

    def rows():
        # HF rows beyond MaxText's vocab (Gemma3: 262208 -> 262144) are kept aside by `_save_dropped_rows`
        for rs in iter_row_chunks(min(info.shape[0], shape[ax]), 1, step_rows):
            index = tuple(rs if a == ax else slice(None) for a in range(len(shape)))
            yield index, run_chain(r.chain, src.read(name, rs), dtype)
        # MaxText's vocab padding: rows HF does not have are zeros
        for rs in iter_row_chunks(shape[ax] - info.shape[0], 1, step_rows):
            rs = slice(rs.start + info.shape[0], rs.stop + info.shape[0])
            index = tuple(rs if a == ax else slice(None) for a in range(len(shape)))
            yield index, np.zeros(tuple(rs.stop - rs.start if a == ax else n for a, n in enumerate(shape)), dtype)

    return rows, tuple(min(step_rows, n) if a == ax else n for a, n in enumerate(shape))


def _with_aliases(family: type[Family], folder: SafetensorsFolder) -> SafetensorsFolder:
    """Tensors some writers name differently, renamed to the names the rules use (`Family.hf_aliases`)."""
    for want, alt in family.hf_aliases:
        names = folder.tensors
        if not any(n.startswith(want) for n in names) and any(n.startswith(alt) for n in names):
            folder.tensors = {(want + n[len(alt):] if n.startswith(alt) else n): info for n, info in names.items()}
    return folder


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


def _load_dropped_rows(plan: list[Leaf], root: Path) -> dict[str, np.ndarray]:
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
) -> Result:
    """Convert an HF safetensors folder to a MaxText Orbax checkpoint at `out` (`out/0/items`).

    `with_mtp`: also convert the multi-token-prediction layer (DeepSeek-V3: `mtp_block`), otherwise skipped."""
    from converters.orbax_io import LazyArray, WriteProgress, write_checkpoint

    src = Path(src)
    out_dtype = _dtype(dtype)
    outputs.check_destination(out, overwrite)
    cfg = load_hf_config(src, hf_config, model)
    family = registry.family_for_config(cfg)
    plan = family.plan(cfg, scan, ("mtp",) if with_mtp else ())
    folder = quant.decoded_source(_with_aliases(family, SafetensorsFolder(src)), cfg)  # quantized sources decode while read
    validate_hf_source(family, cfg, plan, folder)

    flat = {}
    for leaf in plan:
        leaf_dtype = leaf.rule.out_dtype(out_dtype)
        pieces, piece_shape = _hf_pieces(leaf, folder, leaf_dtype)
        flat[leaf.path] = LazyArray(leaf.shape, leaf_dtype, pieces, piece_shape, name=leaf.path)
    total = sum(a.nbytes for a in flat.values())
    bar = progress(total, len(flat)) if progress else None
    counter = WriteProgress(bar.update if bar is not None else None)

    with outputs.atomic_dir(out, overwrite) as tmp:
        write_checkpoint(tmp, _nest(flat), scan_layers=scan, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                         use_compression=compress, workers=workers, progress=counter)
        if bar is not None:
            bar.close()
        _save_dropped_rows(plan, folder, tmp)
        sidecar = tmp / outputs.SIDECAR
        copied = outputs.copy_hf_extras(src, sidecar)
        if hf_config or "config.json" not in copied:  # the config actually used, for the way back
            (sidecar / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        outputs.write_manifest(
            tmp,
            direction="hf->maxtext",
            family=family.name,
            options={"scan_layers": scan, "dtype": dtype, "use_ocdbt": use_ocdbt, "use_zarr3": use_zarr3, "compress": compress,
                     **({"with_mtp": True} if with_mtp else {})},
            source=outputs.describe_source(src),  # + repo, commit sha and file sha256s when `ckptflow download` staged it
        )
    return Result(Path(out), family.name, total, len(flat))


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
    plans = {(scan, ex): family.plan(cfg, scan, ex) for ex in [(), *optional] for scan in (True, False)}
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


def _export_tensors(plan: list[Leaf]) -> list[tuple[Leaf, str, list[Piece] | None]]:
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


def _hf_blocks(leaf: Leaf, pieces: list[Piece] | None, reader, dtype: np.dtype, dropped: dict | None = None) -> Iterator[np.ndarray]:
    """The blocks (whole tensor, expert rows, or row chunks) of one HF tensor, read from its MaxText array(s).

    `dropped`: HF rows past the MaxText array's end (see `_load_dropped_rows`), appended unchanged; zeros if absent.
    """
    r = leaf.rule
    if pieces is not None:
        for p in pieces:
            x = r.to_hf([reader.read(path, p.index) for path in leaf.parts or (leaf.path,)], dtype)
            yield x if p.row is None else x[None]
        return
    ax, hf_rows = r.row_axis, r.hf_shape[0]
    row_bytes = math.prod(r.hf_shape[1:]) * 4
    kept = min(hf_rows, leaf.shape[ax])
    for rs in iter_row_chunks(kept, row_bytes, ROW_CHUNK_BYTES):
        index = tuple(rs if a == ax else slice(None) for a in range(len(leaf.shape)))
        yield run_chain(r.chain, reader.read(leaf.path, index), dtype, inverse=True)
    if kept < hf_rows:
        rows = (dropped or {}).get(leaf.hf_name())
        yield rows.astype(dtype) if rows is not None else np.zeros((hf_rows - kept,) + r.hf_shape[1:], dtype)


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
) -> Result:
    """Convert a MaxText checkpoint (ours, or a training run's) to an HF safetensors folder at `out`."""
    from converters.orbax_io import CheckpointReader, find_sidecar_dir

    out_dtype = _dtype(dtype)
    outputs.check_destination(out, overwrite)
    reader = CheckpointReader(ckpt)
    sidecar = find_sidecar_dir(ckpt)
    if hf_config:
        cfg = outputs.read_json(Path(hf_config), "HF config")
    elif model:
        cfg = registry.model(model)[1]
    elif sidecar is not None:
        cfg = outputs.read_json(sidecar / "config.json", "sidecar config.json")
    else:
        raise CkptflowError(f"{reader.root}: no ckptflow sidecar config; pass --model NAME or --hf-config PATH")
    family = registry.family_for_config(cfg)
    cfg = family.config_for_checkpoint(cfg, set(reader.arrays))
    scan, plan = choose_plan(family, cfg, {k: reader.shape(k) for k in reader.arrays})

    tensors = _export_tensors(plan)
    planned = [PlannedTensor(name, leaf.hf_shape, leaf.rule.out_dtype(out_dtype)) for leaf, name, _ in tensors]
    shards = plan_shards(planned, shard_bytes)
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in planned)
    bar = progress(total, len(planned)) if progress else None
    it = iter(tensors)

    # blocks are read and transformed on a background thread while the previous one is written
    dropped = _load_dropped_rows(plan, reader.root)
    blocks = prefetch(((name, b) for leaf, name, pieces in it for b in _hf_blocks(leaf, pieces, reader, leaf.rule.out_dtype(out_dtype), dropped)), depth=1)
    with outputs.atomic_dir(out, overwrite) as tmp:
        for shard, fname in zip(shards, names):
            w = ShardWriter(tmp / fname, shard)
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
        write_index(tmp, shards, names)
        if bar is not None:
            bar.close()
        if sidecar is not None:
            outputs.copy_hf_extras(sidecar, tmp, skip=("config.json",))
        export_cfg = family.export_config(cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(export_cfg, indent=2, sort_keys=True) + "\n")
        if not (tmp / "generation_config.json").exists():
            gen = {k: export_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if export_cfg.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        outputs.write_manifest(
            tmp,
            direction="maxtext->hf",
            family=family.name,
            options={"scan_layers": scan, "dtype": dtype, "shard_bytes": shard_bytes},
            source={**outputs.describe_source(reader.root), "path": str(reader.items)},
        )
    return Result(Path(out), family.name, total, len(planned))
