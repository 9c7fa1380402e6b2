"""The HF side of a conversion: its config, and its tensors as a family's rules name them, checked against the plan."""

from __future__ import annotations

from pathlib import Path

from converters.convert.common import listing
from converters.core import registry
from converters.core.mapping import Family, Leaf
from converters.errors import CkptflowError, MappingError
from converters.io import quantized
from converters.io.files import read_json
from converters.io.safetensors import SafetensorsFolder


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
    """Tensors some writers name differently, renamed to the names the rules use (`Family.hf_aliases`)."""
    for want, alt in family.hf_aliases:
        names = folder.tensors
        if not any(n.startswith(want) for n in names) and any(n.startswith(alt) for n in names):
            folder.tensors = {(want + n[len(alt) :] if n.startswith(alt) else n): info for n, info in names.items()}
    return folder


def hf_source(src: Path, family: type[Family], cfg: dict):
    """An HF folder's tensors as the rules name them: aliases resolved, quantized sources decoded while read."""
    return quantized.decoded_source(with_aliases(family, SafetensorsFolder(src)), cfg)
