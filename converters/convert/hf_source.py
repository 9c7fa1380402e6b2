"""The HF side of a conversion: its config, and its tensors as a family's rules name them, checked against the plan."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from converters.convert.common import listing
from converters.core import registry
from converters.core.mapping import Family, Leaf
from converters.core.transforms import Fusion, Slices
from converters.errors import CkptflowError, MappingError
from converters.io import quantized
from converters.io.files import read_json
from converters.io.folder_view import FolderView
from converters.io.safetensors import SafetensorsFolder, TensorInfo


def load_hf_config(src: Path, hf_config: str | None = None, model: str | None = None) -> dict:
    """The config of the HF folder `src`: `hf_config` when given, else its config.json, else the registry's for
    `model`."""
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
        raise MappingError(f"missing tensors for a {family.name} model: {listing(missing)}")
    bad = [
        f"{n} (expected {list(s)}, got {list(src.info(n).shape)})" for n, s in wanted.items() if src.info(n).shape != s
    ]
    if bad:
        raise MappingError(f"shape mismatch against config.json: {listing(bad, 4)}")
    extra = [n for n in src.tensors if n not in wanted and not family.is_ignored(d, n)]
    if extra:
        raise MappingError(
            f"unexpected tensors a {family.name} model does not have (wrong config.json?): {listing(extra)}"
        )


def with_aliases(family: type[Family], folder: SafetensorsFolder) -> SafetensorsFolder:
    """Tensors some writers name differently, renamed to the names the rules use (`Family.hf_aliases`,
    `Family.hf_renames`)."""
    for want, alt in family.hf_aliases:
        names = folder.tensors
        if not any(n.startswith(want) for n in names) and any(n.startswith(alt) for n in names):
            folder.tensors = {(want + n[len(alt) :] if n.startswith(alt) else n): info for n, info in names.items()}
    for pattern, repl in family.hf_renames:
        names = folder.tensors
        renamed = {n: re.sub(pattern, repl, n) for n in names if re.fullmatch(pattern, n)}
        if renamed and not any(new in names for new in renamed.values()):
            folder.tensors = {renamed.get(n, n): info for n, info in names.items()}
    return folder


class FusedFolder(FolderView):
    """A folder view in which the parts of every `Fusion` read as the one fused tensor the rules name, and the tensor
    of every `Slices` as its views (what they replace hidden). One whose tensors are not all present is left out:
    validation then reports what is missing."""

    def __init__(self, folder, fusions: list[Fusion | Slices]):
        super().__init__(folder, dict(folder.tensors))
        self._fused: dict[str, Fusion] = {}
        self._sliced: dict[str, tuple[TensorInfo, tuple]] = {}
        for f in fusions:
            if isinstance(f, Slices):
                info = folder.tensors.get(f.disk)
                if info is None:
                    continue
                del self.tensors[f.disk]
                for name, index in f.views:
                    shape = _sliced_shape(info, index)
                    nbytes = int(np.prod(shape)) * info.dtype.itemsize
                    self.tensors[name] = TensorInfo(name, info.dtype, shape, -1, nbytes, info.path)
                    self._sliced[name] = (info, index)
                continue
            infos = [folder.tensors.get(n) for n, _ in f.parts]
            if any(i is None for i in infos):
                continue
            for n, _ in f.parts:
                del self.tensors[n]
            shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])  # a fusion joins rows
            nbytes = int(np.prod(shape)) * infos[0].dtype.itemsize
            self.tensors[f.name] = TensorInfo(f.name, infos[0].dtype, shape, -1, nbytes, infos[0].path)
            self._fused[f.name] = f

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        if name in self._sliced:
            info, index = self._sliced[name]
            if rows is not None:
                raise ValueError(f"{name}: a slice of {info.name} is read whole")
            row = self.inner.read(info.name, slice(index[0], index[0] + 1))[0]
            return np.ascontiguousarray(row[index[1:]])
        f = self._fused.get(name)
        if f is None:
            return self.inner.read(name, rows)
        if rows is not None:
            raise ValueError(f"{name}: a fused tensor is read whole")
        return np.ascontiguousarray(f.join([self.inner.read(n) for n, _ in f.parts]))


def _sliced_shape(info: TensorInfo, index: tuple) -> tuple[int, ...]:
    """The shape of `disk[index]` (index[0] an int row, then slices) without reading it."""
    rest = info.shape[1:]
    shape = [len(range(*s.indices(n))) for s, n in zip(index[1:], rest)]
    return tuple(shape) + tuple(rest[len(index) - 1 :])


def hf_source(src: Path, family: type[Family], cfg: dict):
    """An HF folder's tensors as the rules name them: aliases resolved, quantized sources decoded while read, the
    parts of fused tensors (`Family.hf_fusions`) read as one."""
    folder = quantized.decoded_source(with_aliases(family, SafetensorsFolder(src)), cfg)
    try:
        fusions = family.hf_fusions(family.dims(cfg))
    except CkptflowError:  # a config the family refuses: the caller's own dims call reports it
        fusions = []
    return FusedFolder(folder, fusions) if fusions else folder
