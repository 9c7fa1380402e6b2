"""Orbax checkpoints in MaxText's layout, written and read slice by slice.

Writing: every MaxText array is a `LazyArray` (shape, dtype and a generator of `(index, piece)` pairs).
A type handler for it (`converters.io.orbax_handler`, one per write, holding that write's options) reuses
Orbax's own write spec (so the tree metadata, OCDBT manifest, zarr metadata and commit markers are exactly
Orbax's) but writes region by region, with chunks aligned to the pieces (one layer of a scanned stack, a row
block of an embedding), so no stacked array is ever built in memory. It reports `np.ndarray` as its type: the
checkpoint restores as ordinary numpy leaves.

Reading: the tree metadata gives the leaf names; each array is opened with tensorstore through
Orbax's read spec and read one slice at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from converters.errors import CkptflowError, CorruptFileError

Index = tuple  # a tuple of slices / ints into the global array
PieceFn = Callable[[], Iterator[tuple[Index, np.ndarray]]]

PARAM_ROOTS = ("token_embedder", "decoder", "vision_encoder", "mtp_block")
# Flax collections MaxText keeps beside `params` for non-trainable variables (src/maxtext/layers/moe.py), stored as
# `params/<collection>/...`; their arrays are read under their paths like the parameters'
VARIABLE_COLLECTIONS = ("Tid2EidVar", "MoEBiasVar")
TXN_BYTES = 64 << 20  # data buffered per write transaction (per worker) before it is committed
SIDECAR_DIR = Path("ckptflow")  # ckptflow's own files beside a MaxText checkpoint it wrote (in the checkpoint's root)
HF_SIDECAR = SIDECAR_DIR / "hf"  # the source HF config and tokenizer, so converting back needs no extra arguments


@dataclass(eq=False)
class LazyArray:
    """A leaf Orbax can save without us holding it: `pieces()` yields `(index, block)` covering the array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: PieceFn | None  # None: nothing of this array is written by this process (another part's share)
    piece_shape: tuple[int, ...]  # chunk shape for the stored array: one piece maps to whole chunks
    name: str = ""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def __deepcopy__(self, memo):  # Orbax deep-copies host arrays before saving; ours hold no data
        return self


class WriteProgress:
    """Thread-safe byte counter the CLI turns into a progress bar."""

    def __init__(self, callback: Callable[[int], None] | None = None):
        self._lock = threading.Lock()
        self.done = 0
        self._cb = callback

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
        if self._cb:
            self._cb(n)


def write_checkpoint(
    root: Path,
    params: dict,
    *,
    scan_layers: bool,
    use_ocdbt: bool = True,
    use_zarr3: bool = True,
    use_compression: bool = True,
    workers: int = 2,
    progress: WriteProgress | None = None,
    process_id: int | None = None,
    digests: dict | None = None,
    txn_bytes: int = TXN_BYTES,
) -> Path:
    """Write `params` (`{collection: nested dict of LazyArray / np.ndarray}`, the trainable ones under "params") as
    MaxText's step-0 checkpoint under `root`.

    Produces `<root>/0/items` with the tree `{step, params: {params: ..., <other collection>: ...}, opt_state: {}}`
    (MaxText's Linen variable collections: src/maxtext/checkpoint_conversion/to_maxtext.py) and step metadata
    `{"scan_layers": ...}`, as MaxText's `to_maxtext` does. Returns the items path.

    `process_id`: write the arrays into `ocdbt.process_<id>` as process `id` of a multi-process save does (a part of
    a split conversion; `merge_shares` joins them). `digests`: filled with each LazyArray's chunk digests as written.
    `txn_bytes`: data each worker buffers before committing it (memory is about (workers + 1) x (this + a piece)
    + workers x a piece: each worker's open transaction and the piece it produces with its source bytes, and the
    one transaction committing in the background; smaller means more OCDBT commits).
    """
    import orbax.checkpoint as ocp

    from converters.io.orbax_handler import LazyArrayHandler, WriteOptions, registry_for

    # this call's options go to this call's handler only: concurrent writes in one process do not share them
    lazy = LazyArrayHandler(
        WriteOptions(workers=workers, progress=progress, process_id=process_id, digests=digests, txn_bytes=txn_bytes)
    )
    tree = {"step": 0, "params": params, "opt_state": {}}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True, max_to_keep=None)
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=use_ocdbt,
        use_zarr3=use_zarr3,
        use_compression=use_compression,
        type_handler_registry=registry_for(LazyArray, lazy),
    )
    before = set(threading.enumerate())
    try:
        with ocp.CheckpointManager(
            root, item_names=("items",), options=options, item_handlers={"items": handler}
        ) as mgr:
            mgr.save(
                0,
                args=ocp.args.Composite(items=ocp.args.PyTreeSave(tree)),
                custom_metadata={"scan_layers": scan_layers},
            )
            mgr.wait_until_finished()
    except BaseException:
        # Orbax's background threads may still be finishing files for the failed save: let them end
        # before the caller removes the folder, or they would re-create parts of it.
        deadline = time.monotonic() + 30
        for t in set(threading.enumerate()) - before:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        raise
    return root / "0" / "items"


def merge_shares(items: Path, use_zarr3: bool = True) -> None:
    """Rebuild `items`' root OCDBT manifest over every `ocdbt.process_*` sub-store in it, as the primary process of a
    multi-process Orbax save does once all processes have written (Orbax's own merge)."""
    import shutil

    from etils import epath
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    for stale in ("manifest.ocdbt", "d"):  # the root index the first part's own save left: rebuilt over all parts
        p = items / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    asyncio.run(
        ocdbt_utils.merge_ocdbt_per_process_files(
            epath.Path(items), ts_context=ts_utils.get_ts_context(use_ocdbt=True), use_zarr3=use_zarr3
        )
    )


# ----------------------------------------------------------------------------------------------- reading


def find_items_dir(path: str | os.PathLike) -> Path:
    """Accept `<ckpt>`, `<ckpt>/0`, `<ckpt>/0/items`, or a training run dir (`checkpoints/<step>/items`, newest
    step)."""
    p = Path(path).absolute()  # tensorstore's OCDBT driver refuses relative paths
    if not p.exists():
        raise CkptflowError(f"{p}: no such checkpoint")
    for cand in (p, p / "items"):
        if (cand / "_METADATA").exists():
            return cand
    for base in (p, p / "checkpoints"):
        if not base.is_dir():
            continue
        steps = sorted(
            (int(c.name), c) for c in base.iterdir() if c.name.isdigit() and (c / "items" / "_METADATA").exists()
        )
        if steps:
            return steps[-1][1] / "items"
    raise CkptflowError(
        f"{p}: not an Orbax checkpoint (no _METADATA in it, in items/, in <step>/items or checkpoints/<step>/items)"
    )


def checkpoint_root(items: Path) -> Path:
    """The folder our sidecars live in: two levels above `<root>/<step>/items`."""
    return items.parent.parent if items.name == "items" and items.parent.name.isdigit() else items


def _normalize(keys: list) -> list[str]:
    """NNX trees use integer list indices and a trailing `value`; fold them into Linen names (`layers_0`)."""
    out: list[str] = []
    for k in keys:
        if isinstance(k, int) or (isinstance(k, str) and k.isdigit() and out):
            out[-1] = f"{out[-1]}_{k}"
        else:
            out.append(str(k))
    if out and out[-1] == "value":
        out.pop()
    return out


@dataclass
class StoredArray:
    orbax_name: str  # '.'-joined key path Orbax stores the array under
    shape: tuple[int, ...]
    dtype: np.dtype
    _store: object = None


class CheckpointReader:
    """The parameter arrays of an Orbax checkpoint, keyed by MaxText path under `params/params` (`decoder/...`)."""

    def __init__(self, path: str | os.PathLike):
        self.items = find_items_dir(path)
        self.root = checkpoint_root(self.items)
        try:
            meta = json.loads((self.items / "_METADATA").read_text())
            tree = meta["tree_metadata"]
            entries = [([km["key"] for km in e["key_metadata"]], e) for e in tree.values()]
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as e:  # TypeError etc.: JSON of the wrong shape
            raise CorruptFileError(
                f"{self.items}/_METADATA: unreadable Orbax tree metadata ({type(e).__name__}: {e})"
            ) from None
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.arrays: dict[str, StoredArray] = {}
        prefixes = set()
        for keys, entry in entries:
            if not isinstance(entry.get("value_metadata", {}), dict):
                raise CorruptFileError(
                    f"{self.items}/_METADATA: unreadable Orbax tree metadata (value_metadata of {keys} is not an "
                    f"object)"
                )
            if entry.get("value_metadata", {}).get("value_type") not in ("np.ndarray", "jax.Array"):
                continue
            if any(k in ("opt_state", "optimizer", "opt") for k in map(str, keys)):
                continue  # training checkpoints: optimizer state is never read
            norm = _normalize(keys)
            cut = next((i for i, k in enumerate(norm) if k in PARAM_ROOTS), None)
            if cut is None:
                continue
            prefix = tuple(norm[:cut])
            if prefix and prefix[-1] in VARIABLE_COLLECTIONS:  # params/<collection>: beside the parameters
                prefix = prefix[:-1] + ("params",)
            prefixes.add(prefix)
            self.arrays["/".join(norm[cut:])] = StoredArray(".".join(str(k) for k in keys), (), np.dtype("float32"))
        if not self.arrays:
            raise CkptflowError(f"{self.items}: no MaxText parameters (token_embedder/decoder) in this checkpoint")
        if len(prefixes) > 1:
            raise CkptflowError(
                f"{self.items}: parameters under several roots {sorted(prefixes)}; cannot tell which to read"
            )
        self._context = None

    def _open(self, key: str):
        import tensorstore as ts
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        a = self.arrays[key]
        if a._store is None:
            if self._context is None:
                # Orbax's context, reading data files with O_DIRECT (tensorstore falls back to plain reads where
                # that is not possible): the bytes are read once, and not through the page cache
                spec = ts_utils.get_ts_context(use_ocdbt=self.use_ocdbt).spec.to_json()
                spec["file_io_mode"] = {"mode": "direct"}
                self._context = ts.Context(ts.Context.Spec(spec))
            spec = ts_utils.ArrayReadSpec(
                directory=self.items.as_posix(),
                relative_array_filename=a.orbax_name,
                use_zarr3=self.use_zarr3,
                use_ocdbt=self.use_ocdbt,
            )
            try:
                a._store = ts.open(ts.Spec(spec.json), open=True, read=True, context=self._context).result()
            except Exception as e:  # tensorstore raises ValueError with a long spec dump
                raise CorruptFileError(
                    f"{self.items}: cannot open array {key!r}: {str(e).splitlines()[0][:200]}"
                ) from None
            a.shape = tuple(a._store.shape)
            a.dtype = np.dtype(a._store.dtype.numpy_dtype)
        return a._store

    def shape(self, key: str) -> tuple[int, ...]:
        self._open(key)
        return self.arrays[key].shape

    def chunk_shape(self, key: str) -> tuple[int, ...]:
        """The stored write-chunk (zarr3 shard) shape: what one piece wrote, read whole without decoding twice."""
        t = self._open(key)
        shape = t.chunk_layout.write_chunk.shape
        return tuple(int(c) if c else int(n) for c, n in zip(shape or (), t.shape)) if shape else tuple(t.shape)

    def dtype(self, key: str) -> np.dtype:
        self._open(key)
        return self.arrays[key].dtype

    def read(self, key: str, index: Index = ()) -> np.ndarray:
        return self.read_async(key, index).result()

    def read_async(self, key: str, index: Index = ()) -> "PendingRead":
        """Start reading a slice; `.result()` waits for it (tensorstore reads on its own threads meanwhile)."""
        return PendingRead(self, key, self._open(key)[index].read())

    def read_rows(self, key: str, ids) -> np.ndarray:
        """Rows `ids` of a 2-D array (e.g. the embedding rows of a prompt's token ids), without the rest of it."""
        try:
            return np.asarray(self._open(key).oindex[np.asarray(ids, np.int64)].read().result())
        except Exception as e:
            raise CorruptFileError(
                f"{self.items}: cannot read rows of array {key!r}: {str(e).splitlines()[0][:200]}"
            ) from None

    def scan_layers(self) -> bool | None:
        """The `scan_layers` step metadata MaxText writes, when present."""
        meta = self.items.parent / "_CHECKPOINT_METADATA"
        try:
            return json.loads(meta.read_text()).get("custom_metadata", {}).get("scan_layers")
        except (OSError, ValueError, AttributeError):
            return None


@dataclass
class PendingRead:
    reader: CheckpointReader
    key: str
    future: object

    def result(self) -> np.ndarray:
        try:
            return np.asarray(self.future.result())
        except Exception as e:
            raise CorruptFileError(
                f"{self.reader.items}: cannot read array {self.key!r}: {str(e).splitlines()[0][:200]}"
            ) from None


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every parameter array in full (small models only: verification and tests)."""
    r = CheckpointReader(path)
    return {k: r.read(k) for k in sorted(r.arrays)}


def find_sidecar_dir(path: str | os.PathLike) -> Path | None:
    """`<ckpt>/ckptflow/hf`, the source HF config and tokenizer kept beside a checkpoint we wrote."""
    items = find_items_dir(path)
    d = checkpoint_root(items) / HF_SIDECAR
    return d if (d / "config.json").exists() else None


def find_sidecar_hf_config(path: str | os.PathLike) -> dict | None:
    d = find_sidecar_dir(path)
    return json.loads((d / "config.json").read_text()) if d else None
