"""Declarative model mappings: a family is a list of rules plus how its layers are grouped.

A `Rule` pairs one HF tensor name (with `{i}` for the layer index) with one MaxText tree path and the
chain of invertible transforms between them. A `Family` turns an HF config into `Dims`, lists its global
and per-layer rules, and says how layers stack when scanned. `Family.plan()` expands that into `Leaf`s:
one per MaxText array, each knowing which HF tensors fill it. Both conversion directions walk the same
plan, so nothing is written twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from converters.errors import CkptflowError
from converters.transforms import Transform

SCAN_AXIS = 1  # MaxText's default param_scan_axis: the layer axis is inserted at position 1


@dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one MaxText array (per layer for layer rules).

    `row_axis`: the MaxText axis that HF axis 0 becomes, for 2-D tensors streamed in row chunks
    (embedding: 0, lm_head -> logits kernel: 1); the chain must then act row by row. A MaxText size along
    that axis larger than HF's is zero padding (vocab padding), dropped again on export.
    """

    hf: str
    mt: str
    hf_shape: tuple[int, ...]
    mt_shape: tuple[int, ...]
    chain: tuple[Transform, ...] = ()
    row_axis: int | None = None


@dataclass(frozen=True)
class LayerGroup:
    """Rules repeated over `hf_layers`: stacked under `stacked` when scanning, else one prefix per layer."""

    rules: tuple[Rule, ...]
    hf_layers: tuple[int, ...]
    stacked: str | None
    unstacked: tuple[str, ...]


@dataclass(frozen=True)
class Leaf:
    """One MaxText array and the HF tensors that fill it."""

    path: str
    rule: Rule
    hf_layers: tuple[int, ...] | None = None  # stacked along SCAN_AXIS, one entry per slice
    hf_layer: int | None = None  # an unstacked layer's HF index

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.rule.mt_shape
        if self.hf_layers is None:
            return s
        return s[:SCAN_AXIS] + (len(self.hf_layers),) + s[SCAN_AXIS:]

    def hf_name(self, layer: int | None = None) -> str:
        if layer is None:
            layer = self.hf_layer
        return self.rule.hf.format(i=layer) if "{i}" in self.rule.hf else self.rule.hf

    def hf_names(self) -> list[tuple[int | None, str]]:
        """(slice index along the scan axis or None, HF tensor name) for every HF tensor of this leaf."""
        if self.hf_layers is None:
            return [(None, self.hf_name())]
        return [(j, self.hf_name(l)) for j, l in enumerate(self.hf_layers)]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Dims:
    """Architecture numbers every family uses, plus family-specific extras."""

    emb: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    layers: int
    tied: bool
    extra: dict[str, Any] = field(default_factory=dict)


def require(cfg: dict, key: str, family: str):
    if key not in cfg or cfg[key] is None:
        raise CkptflowError(f"config.json for a {family} model is missing {key!r}")
    return cfg[key]


class Family:
    """Base class of a model family. Subclasses are data: names, configs and rule lists."""

    name: ClassVar[str]  # ckptflow family name, e.g. "llama3.1"
    model_types: ClassVar[tuple[str, ...]]  # HF config `model_type`s this family converts
    architectures: ClassVar[tuple[str, ...]]  # HF `architectures` written on export (first one)
    models: ClassVar[dict[str, dict]]  # MaxText model name -> its published HF config.json
    ignored_hf: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq",)  # HF tensors never read

    # ---- to override -------------------------------------------------------------------------------
    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        raise NotImplementedError

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        raise NotImplementedError

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        raise NotImplementedError

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        """Default: one homogeneous stack, `decoder/layers` scanned or `decoder/layers_<i>` unscanned."""
        n = d.layers
        return [LayerGroup(tuple(cls.layer_rules(d)), tuple(range(n)), "decoder/layers", tuple(f"decoder/layers_{i}" for i in range(n)))]

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        """Regexes of HF tensors that exist in checkpoints but are not converted (e.g. a tied lm_head)."""
        out = list(cls.ignored_hf)
        if d.tied:
            out.append(r"lm_head\.weight")
        return out

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        """The config.json written on export: the source config with what the conversion changed."""
        out = {k: v for k, v in cfg.items() if k not in ("quantization_config", "_name_or_path", "torch_dtype")}
        out["architectures"] = list(cfg.get("architectures") or cls.architectures[:1])
        out["dtype"] = dtype
        return out

    # ---- derived --------------------------------------------------------------------------------
    @classmethod
    def plan(cls, cfg: dict, scan: bool) -> list[Leaf]:
        d = cls.dims(cfg)
        leaves = [Leaf(r.mt, r) for r in cls.global_rules(d)]
        for g in cls.layer_groups(d, scan):
            for r in g.rules:
                if scan and g.stacked is not None:
                    leaves.append(Leaf(f"{g.stacked}/{r.mt}", r, hf_layers=g.hf_layers))
                else:
                    leaves.extend(Leaf(f"{p}/{r.mt}", r, hf_layer=l) for p, l in zip(g.unstacked, g.hf_layers))
        paths = [l.path for l in leaves]
        dupes = {p for p in paths if paths.count(p) > 1}
        assert not dupes, f"{cls.name}: duplicate MaxText paths {sorted(dupes)}"
        return leaves

    @classmethod
    def is_ignored(cls, d: Dims, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in cls.ignored(d))
