"""HF embedding rows a MaxText vocabulary cannot hold (Gemma3: 262208 -> 262144): kept beside the MaxText
checkpoint when importing, put back when exporting."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from converters.core.mapping import Leaf
from converters.io.orbax import SIDECAR_DIR
from converters.io.safetensors import SafetensorsFile, SafetensorsFolder, read_tensor, save_file

DROPPED_ROWS = SIDECAR_DIR / "dropped_rows.safetensors"  # relative to the MaxText checkpoint's root


def dropped_rows(plan: list[Leaf]) -> list[tuple[Leaf, str, int]]:
    """Row-streamed tensors with more HF rows than their MaxText array: (leaf, HF name, rows MaxText keeps)."""
    out = []
    for leaf in plan:
        if leaf.row_streamed and leaf.rule.hf_shape[0] > leaf.shape[leaf.rule.row_axis]:
            out.append((leaf, leaf.hf_name(), leaf.shape[leaf.rule.row_axis]))
    return out


def save_dropped_rows(plan: list[Leaf], src: SafetensorsFolder, root: Path) -> None:
    """Keep the HF rows MaxText cannot hold, unchanged, in `DROPPED_ROWS` so export can restore them."""
    dropped = {name: src.read(name, slice(kept, leaf.rule.hf_shape[0])) for leaf, name, kept in dropped_rows(plan)}
    if dropped:
        (root / DROPPED_ROWS).parent.mkdir(parents=True, exist_ok=True)
        save_file(root / DROPPED_ROWS, dropped)


def load_dropped_rows(plan: list[Leaf], root: Path) -> dict[str, np.ndarray]:
    """The rows `save_dropped_rows` kept, per HF name; a tensor without them gets zero rows (with a warning)."""
    wanted = dropped_rows(plan)
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
                f"{name}: rows {kept}..{leaf.rule.hf_shape[0] - 1} are not in the MaxText checkpoint and {path} does "
                f"not "
                "have them; they are written as zeros",
                stacklevel=3,
            )
    return out
