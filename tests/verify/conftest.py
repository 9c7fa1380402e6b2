"""Fixtures for the verification tests: converted tiny checkpoints and deliberately broken copies.

Breakage is applied to the *produced* Orbax checkpoint (restore with plain Orbax, modify, save a new
checkpoint in the same layout with the same sidecar), so these tests do not depend on converter
internals. Every damage function works per layer, so it applies to scanned and unscanned layouts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

FAMILIES = ("llama3.1", "qwen2.5", "qwen3")


class EditableCheckpoint:
    """A restored MaxText tree with per-layer access that hides the scanned/unscanned difference."""

    def __init__(self, tree: dict):
        self.tree = tree
        self.decoder = tree["params"]["params"]["decoder"]
        self.scanned = "layers" in self.decoder
        if self.scanned:
            first = next(iter(_leaves(self.decoder["layers"]).values()))
            self.num_layers = first.shape[1]
        else:
            self.num_layers = sum(1 for k in self.decoder if k.startswith("layers_"))

    def _node(self, layer: int, rel: str):
        parts = rel.split("/")
        node = self.decoder["layers"] if self.scanned else self.decoder[f"layers_{layer}"]
        for p in parts[:-1]:
            node = node[p]
        return node, parts[-1]

    def get(self, layer: int, rel: str) -> np.ndarray:
        node, leaf = self._node(layer, rel)
        return np.take(node[leaf], layer, axis=1) if self.scanned else node[leaf]

    def set(self, layer: int, rel: str, value: np.ndarray) -> None:
        node, leaf = self._node(layer, rel)
        value = np.asarray(value).astype(node[leaf].dtype if self.scanned else self.get(layer, rel).dtype)
        if self.scanned:
            arr = np.array(node[leaf])
            arr[:, layer] = value
            node[leaf] = arr
        else:
            node[leaf] = value

    def layer_keys(self) -> list[str]:
        sub = self.decoder["layers"] if self.scanned else self.decoder["layers_0"]
        return sorted(_leaves(sub))


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- damage functions: each takes an EditableCheckpoint and the HF config dict -------------------

QUERY, KEY = "self_attention/query/kernel", "self_attention/key/kernel"


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _to_half_split(a: np.ndarray) -> np.ndarray:
    """Undo the converter's RoPE permutation on the last (head_dim) axis: interleaved -> halves."""
    return np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)


def _to_interleaved(a: np.ndarray) -> np.ndarray:
    """Apply Llama's RoPE permutation (halves -> interleaved) where it does not belong."""
    h = a.shape[-1] // 2
    out = np.empty_like(a)
    out[..., 0::2], out[..., 1::2] = a[..., :h], a[..., h:]
    return out


def skip_rope_permutation(ck: EditableCheckpoint, cfg: dict) -> None:
    for i in range(ck.num_layers):
        for k in (QUERY, KEY):
            ck.set(i, k, _to_half_split(ck.get(i, k)))


def wrong_rope_permutation(ck: EditableCheckpoint, cfg: dict) -> None:
    for i in range(ck.num_layers):
        for k in (QUERY, KEY):
            ck.set(i, k, _to_interleaved(ck.get(i, k)))


def skip_query_scaling(ck: EditableCheckpoint, cfg: dict) -> None:
    for i in range(ck.num_layers):
        ck.set(i, QUERY, ck.get(i, QUERY).astype(np.float32) * np.sqrt(_head_dim(cfg)))


def swap_layers(ck: EditableCheckpoint, cfg: dict) -> None:
    for k in ck.layer_keys():
        a, b = ck.get(0, k).copy(), ck.get(1, k).copy()
        ck.set(0, k, b)
        ck.set(1, k, a)


def transpose_square_query_kernel(ck: EditableCheckpoint, cfg: dict) -> None:
    for i in range(ck.num_layers):
        q = ck.get(i, QUERY)
        e, n, d = q.shape
        assert e == n * d, "needs a square query projection"
        ck.set(i, QUERY, q.reshape(e, e).T.reshape(e, n, d))


def swap_gate_and_up(ck: EditableCheckpoint, cfg: dict) -> None:
    for i in range(ck.num_layers):
        a, b = ck.get(i, "mlp/wi_0/kernel").copy(), ck.get(i, "mlp/wi_1/kernel").copy()
        ck.set(i, "mlp/wi_0/kernel", b)
        ck.set(i, "mlp/wi_1/kernel", a)


DAMAGES = {
    f.__name__: f
    for f in (
        skip_rope_permutation,
        wrong_rope_permutation,
        skip_query_scaling,
        swap_layers,
        transpose_square_query_kernel,
        swap_gate_and_up,
    )
}


def save_damaged(src: Path, dst: Path, damage) -> Path:
    """Copy checkpoint `src` to `dst` with `damage(EditableCheckpoint, hf_config)` applied."""
    import json

    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore((src / "0" / "items").absolute())
    cfg = json.loads((src / "ckptflow" / "hf" / "config.json").read_text())
    damage(EditableCheckpoint(tree), cfg)
    tree.pop("opt_state", None)  # empty; MaxText never reads it
    ocp.PyTreeCheckpointer().save((dst / "0" / "items").absolute(), tree)
    shutil.copytree(src / "ckptflow", dst / "ckptflow")
    return dst


@pytest.fixture(scope="session")
def converted(tiny_model, tmp_path_factory):
    """`converted(family, scan=True, dtype="bfloat16")` -> (hf_dir, maxtext_dir), cached per session."""
    from converters.convert import hf_to_maxtext

    cache: dict = {}

    def make(family: str, scan: bool = True, dtype: str = "bfloat16"):
        key = (family, scan, dtype)
        if key not in cache:
            hf = tiny_model(family)
            out = tmp_path_factory.mktemp(f"mt-{family}-{'scan' if scan else 'noscan'}-{dtype}") / "ckpt"
            hf_to_maxtext(hf, out, scan=scan, dtype=dtype)
            cache[key] = (Path(hf), out)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def damaged(converted, tmp_path_factory):
    """`damaged(family, damage_name, scan=True)` -> (hf_dir, broken maxtext_dir), cached per session.

    damage_name is a key of DAMAGES (tests parametrize by name: conftest is not importable).
    """
    cache: dict = {}

    def make(family: str, damage: str, scan: bool = True):
        key = (family, damage, scan)
        if key not in cache:
            hf, good = converted(family, scan)
            dst = tmp_path_factory.mktemp(f"broken-{family}-{damage}-{scan}") / "ckpt"
            cache[key] = (hf, save_damaged(good, dst, DAMAGES[damage]))
        return cache[key]

    return make
