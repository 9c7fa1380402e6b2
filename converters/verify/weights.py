"""Both sides' weights for verification, read one layer, one expert or one vocabulary block at a time.

`SourceWeights`: the HF folder's tensors as the converter reads them (aliases resolved, quantized sources decoded).
`CheckpointWeights`: a MaxText checkpoint through its family's plan (`converters.core.mapping`): the arrays as stored
(what the JAX reference computes with) and every HF tensor mapped back as `convert --to hf` computes it (before
its final cast: `AS_COMPUTED`). Reads of the current step are cached so each stored array is read once for every
consumer, then released.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.convert.dropped_rows import load_dropped_rows
from converters.convert.hf_source import hf_source
from converters.convert.to_hf import choose_plan, export_tensors
from converters.core import registry
from converters.core.mapping import Leaf, Piece
from converters.core.transforms import run_chain
from converters.errors import CkptflowError
from converters.io.orbax import CheckpointReader
from converters.verify.metrics import NonFinite

F32 = np.dtype(np.float32)
# Mapped-back tensors come as computed: in the stored dtype when the chain only moves elements (compared bit for bit,
# cast by the model's loader), float32 when it changes values (never rounded again).
AS_COMPUTED = None


def index_key(index: tuple) -> tuple:
    """A hashable form of a numpy index (slices are not hashable before Python 3.12)."""
    return tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)


class SourceWeights:
    """The tensors of an HF folder, by the names the family's rules use."""

    def __init__(self, folder: str | os.PathLike, family, cfg: dict):
        self.folder = hf_source(Path(folder), family, cfg)

    def __contains__(self, name: str) -> bool:
        return name in self.folder

    def read(self, name: str) -> np.ndarray:
        return self.folder.read(name)

    def row(self, name: str, i: int) -> np.ndarray:
        """Row i of a tensor (one expert of a fused expert tensor)."""
        return self.folder.read(name, slice(i, i + 1))[0]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.folder.read(name, slice(start, stop))

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` (sorted, unique) of a 2-D tensor, each read on its own (a prompt's embedding rows)."""
        return (
            np.stack([self.row(name, int(i)) for i in ids])
            if len(ids)
            else np.zeros((0,) + self.folder.info(name).shape[1:])
        )


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor of the plan: the MaxText array(s) it comes from, and where."""

    name: str
    leaf: Leaf
    pieces: tuple[Piece, ...] | None  # None: a 2-D tensor streamed in row blocks (embedding, lm_head)
    layer: int | None  # its HF decoder layer (None: global)

    @property
    def kind(self) -> str:
        """The tensor kind, named by its MaxText array(s) within a layer (`self_attention/query/kernel`)."""
        mt = self.leaf.rule.mt
        return mt if isinstance(mt, str) else "+".join(mt)

    def reads(self, piece: Piece) -> list[tuple[str, tuple]]:
        return [(path, piece.index) for path in self.leaf.split_paths or (self.leaf.path,)]


def _layer_of(leaf: Leaf, piece: Piece) -> int | None:
    return leaf.layer_at(piece.index)


class TensorIndex:
    """The HF tensors of a family plan: by decoder layer, routed experts by layer and expert, globals, row-streamed."""

    def __init__(self, plan: list[Leaf]):
        self.tensors: dict[str, HFTensor] = {}
        self.layers: dict[int, list[str]] = defaultdict(list)  # HF layer -> its tensors, routed experts excluded
        # HF layer -> expert -> [(tensor, its piece)]: per-expert tensors, or one row of a fused expert tensor
        self.experts: dict[int, dict[int, list[tuple[HFTensor, Piece]]]] = defaultdict(lambda: defaultdict(list))
        for leaf, name, pieces in export_tensors(plan):
            # decoder layers only: an encoder's layers (Gemma3's vision tower) are read whole with the globals
            layer = _layer_of(leaf, pieces[0]) if pieces and leaf.path.startswith("decoder/") else None
            t = HFTensor(name, leaf, tuple(pieces) if pieces is not None else None, layer)
            self.tensors[name] = t
            if leaf.rule.experts:
                for p in pieces:
                    self.experts[_layer_of(leaf, p)][p.index[0]].append((t, p))
            elif t.layer is not None:
                self.layers[t.layer].append(name)
        self.globals = [n for n, t in self.tensors.items() if t.layer is None and t.pieces is not None]
        self.row_streamed = [n for n, t in self.tensors.items() if t.pieces is None]

    def by_path(self, path: str) -> str | None:
        """The HF tensor of a global MaxText array (`token_embedder/embedding`, `decoder/logits_dense/kernel`)."""
        return next((n for n, t in self.tensors.items() if t.leaf.path == path), None)


class CheckpointWeights:
    """A MaxText checkpoint, its arrays by step and its HF tensors mapped back.

    config: the HF config the checkpoint was converted from (the source folder's, or the sidecar's)."""

    def __init__(self, path: str | os.PathLike, cfg: dict):
        self.reader = CheckpointReader(path)
        family = registry.family_for_config(cfg)
        self.cfg = family.config_for_checkpoint(cfg, set(self.reader.arrays))
        self.family = family
        self.shapes = {k: self.reader.shape(k) for k in self.reader.arrays}
        self.scan, self.plan = choose_plan(family, self.cfg, self.shapes)
        self.dtype = np.dtype(self.reader.dtype(self.plan[0].path))
        self.dropped = load_dropped_rows(self.plan, self.reader.root)
        self.index = TensorIndex(self.plan)
        self._cache: dict[tuple, object] = {}
        self.nonfinite = NonFinite()  # NaN / Inf in the stored arrays, by MaxText path (every element counted once)

    # ---- stored arrays (one step at a time) ------------------------------------------------------------
    def prefetch(self, reads) -> None:
        """Start reading (path, index) pairs in the background (tensorstore); `read` then waits for them."""
        for path, index in reads:
            k = (path, index_key(index))
            if k not in self._cache:
                self._cache[k] = self.reader.read_async(path, index)

    def read(self, path: str, index: tuple = ()) -> np.ndarray:
        k = (path, index_key(index))
        got = self._cache.get(k)
        if isinstance(got, np.ndarray):
            return got
        got = got.result() if got is not None else self.reader.read(path, index)
        self._cache[k] = self.nonfinite.scan(path, got, k[1])
        return got

    def release(self, reads=None) -> None:
        """Forget the step's arrays, or the (path, index) pairs `reads` only (their memory goes with its last user)."""
        if reads is None:
            self._cache.clear()
        for path, index in reads or ():
            self._cache.pop((path, index_key(index)), None)

    def read_rows(self, path: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D array (a prompt's embedding rows), read without the rest of the table."""
        return self.reader.read_rows(path, ids)

    def read_many(self, reads) -> dict[tuple, np.ndarray]:
        """(path, index) pairs read at once, outside the step cache (one expert's slices): {(path, index_key):
        array}."""
        pending = {(path, index_key(index)): self.reader.read_async(path, index) for path, index in reads}
        return {k: self.nonfinite.scan(k[0], p.result(), k[1]) for k, p in pending.items()}

    # ---- mapped back ------------------------------------------------------------------------------------
    def layer_reads(self, layer: int) -> list[tuple[str, tuple]]:
        ts = self.index.tensors
        return [r for n in self.index.layers.get(layer, ()) for r in ts[n].reads(ts[n].pieces[0])]

    def back(self, name: str, runtime: bool = False) -> np.ndarray:
        """HF tensor `name` (one piece: not an expert, not row-streamed) mapped back (dtype: `AS_COMPUTED`)."""
        t = self.index.tensors[name]
        return t.leaf.rule.to_hf([self.read(*r) for r in t.reads(t.pieces[0])], AS_COMPUTED, runtime)

    def back_piece(self, t: HFTensor, piece: Piece, arrays: dict[tuple, np.ndarray]) -> np.ndarray:
        """One expert's part of an expert tensor (a fused tensor's row), from `read_many`'s arrays (`AS_COMPUTED`)."""
        return t.leaf.rule.to_hf([arrays[(path, index_key(index))] for path, index in t.reads(piece)], AS_COMPUTED)

    def back_gather(self, name: str, ids: np.ndarray, runtime: bool = False) -> np.ndarray:
        """Rows `ids` (sorted, unique) of the embedding mapped back, float32 (a prompt's rows)."""
        t = self.index.tensors[name]
        r = t.leaf.rule
        kept = self.kept_rows(name)
        ids = np.asarray(ids, np.int64)
        inside, beyond = ids[ids < kept], ids[ids >= kept]
        chain = r.runtime_chain if runtime and r.runtime_chain is not None else r.chain
        out = [run_chain(chain, self.read_rows(t.leaf.path, inside), F32, inverse=True)] if len(inside) else []  # small
        if len(beyond):
            extra = self.dropped.get(name)
            out.append(
                np.asarray(extra[beyond - kept], F32)
                if extra is not None
                else np.zeros((len(beyond),) + r.hf_shape[1:], F32)
            )
        return np.concatenate(out) if len(out) > 1 else out[0]

    def back_rows(self, name: str, start: int, stop: int, runtime: bool = False) -> np.ndarray:
        """Rows [start, stop) of a row-streamed HF tensor mapped back (`AS_COMPUTED`): the checkpoint's rows, then
        (Gemma3)
        the rows MaxText cannot hold, from the sidecar (zeros without it), as `convert --to hf` writes them. The
        stored block is read through the step cache (`rows_index`), so the reference's logits share the read."""
        t = self.index.tensors[name]
        r = t.leaf.rule
        kept = self.kept_rows(name)
        parts = []
        if start < kept:
            index = self.rows_index(name, start, min(stop, kept))
            chain = r.runtime_chain if runtime and r.runtime_chain is not None else r.chain
            parts.append(run_chain(chain, self.read(t.leaf.path, index), AS_COMPUTED, inverse=True))
        if stop > kept:
            lo = max(start, kept)
            extra = self.dropped.get(name)
            rows = extra[lo - kept : stop - kept] if extra is not None else np.zeros((stop - lo,) + r.hf_shape[1:])
            parts.append(np.asarray(rows, parts[0].dtype if parts else F32))
        return parts[0] if len(parts) == 1 else np.concatenate([p.astype(F32) for p in parts])

    def rows_reads(self, name: str, start: int, stop: int) -> list[tuple[str, tuple]]:
        """The stored block `back_rows(name, start, stop)` reads (none past the rows the checkpoint holds)."""
        kept = self.kept_rows(name)
        return (
            [(self.index.tensors[name].leaf.path, self.rows_index(name, start, min(stop, kept)))]
            if start < kept
            else []
        )

    def kept_rows(self, name: str) -> int:
        """Rows of a row-streamed HF tensor the checkpoint holds (fewer than HF's for Gemma3's embedding)."""
        t = self.index.tensors[name]
        return min(t.leaf.rule.hf_shape[0], t.leaf.shape[t.leaf.rule.row_axis])

    def rows_index(self, name: str, start: int, stop: int) -> tuple:
        """The index of HF rows [start, stop) in the stored array (rows of the embedding, columns of the logits
        kernel)."""
        t = self.index.tensors[name]
        return tuple(slice(start, stop) if a == t.leaf.rule.row_axis else slice(None) for a in range(len(t.leaf.shape)))

    def expert_reads(self, layer: int, e: int) -> list[tuple[str, tuple]]:
        return [r for t, p in self.index.experts[layer][e] for r in t.reads(p)]


def config_of_checkpoint(path, hf_config: str | os.PathLike | None) -> tuple[dict, Path | None]:
    """The HF config of a checkpoint: `hf_config` (a config.json or its folder), else our sidecar's."""
    from converters.io.orbax import find_sidecar_dir
    from converters.verify.hf_side import read_config

    if hf_config is not None:
        p = Path(hf_config)
        if p.is_dir():
            return read_config(p), p
        if p.is_file():
            return read_config(p.parent, p.name), p.parent
        raise CkptflowError(f"HF config not found: {p}")
    sidecar = find_sidecar_dir(path)
    if sidecar is None:
        raise CkptflowError(
            f"{path}: no ckptflow/hf/config.json beside the checkpoint; pass --hf-config with the model's config.json"
        )
    return read_config(sidecar), sidecar
