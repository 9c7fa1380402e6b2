"""Declarative model mappings: a family is a list of rules plus how its layers are grouped.

A `Rule` pairs one HF tensor name (with `{i}` for the layer index, `{e}` for the expert of stacked MoE
experts) with one MaxText tree path (or several, when one HF tensor is split) and the chain of invertible
transforms between them. A `Family` turns an HF config into `Dims`, lists its global
and per-layer rules, and says how layers stack when scanned. `Family.plan()` expands that into `Leaf`s:
one per MaxText array, each knowing which HF tensors fill it. Both conversion directions walk the same
plan, so nothing is written twice.

Stacks. A scanned `LayerGroup` stacks its layers along SCAN_AXIS (`[d0, L, d1, ...]`). A nested stack (MaxText
scanning blocks whose own sublayers are scanned again, e.g. Qwen3-Next's `decoder/layers/local_layers`) has
several stacked axes, outermost first, consecutive from SCAN_AXIS (`LayerGroup.stack`, `[d0, B, S, d1, ...]`):
`nnx_scan.create_scanned_layers` (MaxText `src/maxtext/layers/nnx_scan.py`) inserts each scan's axis at
`param_scan_axis`, the inner scan first, so the outer one lands in front of it. The stack's HF layers are listed
in row-major order over the stacked axes, and every slice (one index per stacked axis) is one piece.
"""

from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import numpy as np

from converters.core.transforms import Fusion, Slices, Split, Transform, run_chain
from converters.errors import CkptflowError

SCAN_AXIS = 1  # MaxText's default param_scan_axis: the layer axis is inserted at position 1


@dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one MaxText array (per layer for layer rules).

    `row_axis`: the MaxText axis that HF axis 0 becomes, for 2-D tensors streamed in row chunks
    (embedding: 0, lm_head -> logits kernel: 1); the chain must then act row by row. A MaxText size along
    that axis larger than HF's is zero padding (vocab padding), dropped again on export; a smaller one
    (Gemma3: 262144 of 262208) keeps the HF rows past it in a sidecar file, restored on export.

    `experts`: the MaxText array gets a leading expert axis of this size (`[E, ...]`; scanned `[E, L, ...]`,
    the layer axis at SCAN_AXIS after it). The HF side is one tensor per expert (`{e}` in `hf`), or one
    fused tensor whose axis 0 holds the experts, read one expert row at a time. Either way `hf_shape`,
    `mt_shape` and the chain are one expert's, and every (expert, layer) slice is its own piece.

    `split`: one HF tensor fills several MaxText arrays (`mt` is then a tuple of paths in `split` order, all
    of shape `mt_shape`). Import takes part k, then runs the chain; export runs the inverse chain on every
    part and joins them back into the HF tensor.

    `dtype`: a tensor the model keeps in this dtype whatever `--dtype` says (DeepSeek-V3's float32
    `e_score_correction_bias`): stored so in the MaxText checkpoint and written so on export.

    `hf_dtype`: the dtype the HF tensor is written in on export when it differs from the MaxText one (DeepSeek-V4's
    `tid2eid`: int64 in HF, float32 in MaxText, which keeps every variable inexact); values must convert exactly.

    `collection`: the Flax collection the MaxText array is stored in (`params/<collection>/...` in the checkpoint);
    MaxText keeps some non-trainable variables apart (DeepSeek-V4's `Tid2EidVar`, `MoEBiasVar`). Paths stay unique
    across collections, so the rest of the engine names arrays by path alone.

    `scan_axis`: the axis a scanned stack inserts its layer axis at: SCAN_AXIS for parameters; MaxText stacks the
    variables of other collections at 0 (`MoEBiasVar` `[L, E]`, src/maxtext/layers/nnx_decoders.py).

    `part_shapes`: for a `split` whose parts differ in shape (`Sections`), each part's MaxText shape, in order
    (`mt_shape` is then the first's).

    `fill`: an array only MaxText has (DeepSeek-V4's `mhc_norm/scale`): no HF tensor (`hf` is ""); import writes this
    value everywhere, export checks the array still holds only it (anything else has no HF place and would be lost).

    `runtime_chain`: where MaxText's computation differs from HF's float32 computation by more than the stored
    values say, the chain that maps HF values to what MaxText computes with (Gemma3's embedding: the table holds
    x * bf16(sqrt(hidden)), HF multiplies by the exact sqrt(hidden) in float32). Verification inverts it to give
    the HF model weights that make it compute what MaxText computes from the checkpoint (its layout check); the
    conversion itself uses `chain`.
    """

    hf: str
    mt: str | tuple[str, ...]
    _: KW_ONLY  # shapes by name: (hf_shape, mt_shape) positionally are easy to swap
    hf_shape: tuple[int, ...]
    mt_shape: tuple[int, ...]
    chain: tuple[Transform, ...] = ()
    row_axis: int | None = None
    experts: int = 0
    split: Split | None = None
    dtype: str | None = None
    hf_dtype: str | None = None
    collection: str = "params"
    scan_axis: int = SCAN_AXIS
    part_shapes: tuple[tuple[int, ...], ...] | None = None
    fill: float | None = None
    runtime_chain: tuple[Transform, ...] | None = None

    def __post_init__(self):
        assert (self.fill is None) == bool(self.hf), f"{self.mt}: a rule has an HF tensor or a fill value, not both"
        assert self.part_shapes is None or (self.split is not None and len(self.part_shapes) == self.split.n)

    def out_dtype(self, default: np.dtype) -> np.dtype:
        return np.dtype(self.dtype) if self.dtype else default

    def hf_out_dtype(self, default: np.dtype) -> np.dtype:
        """The dtype the HF tensor is written in on export."""
        return np.dtype(self.hf_dtype) if self.hf_dtype else self.out_dtype(default)

    @property
    def fused_experts(self) -> bool:
        return self.experts > 0 and "{e}" not in self.hf

    def to_maxtext(self, x: np.ndarray, dtype: np.dtype, split_index: int = 0) -> np.ndarray:
        if self.split is not None:
            x = self.split.take(x, split_index)
        return run_chain(self.chain, x, dtype)

    def to_hf(self, pieces: list[np.ndarray], dtype: np.dtype | None, runtime: bool = False) -> np.ndarray:
        """The HF tensor (or one expert row of it) from the matching slice of each MaxText array (`runtime`: through
        `runtime_chain` where the rule has one; `dtype` None: as computed, see `run_chain`)."""
        chain = self.runtime_chain if runtime and self.runtime_chain is not None else self.chain
        xs = [run_chain(chain, p, dtype, inverse=True) for p in pieces]
        x = xs[0] if self.split is None else self.split.join(xs)
        if self.hf_dtype and np.dtype(self.hf_dtype).kind in "iu":
            # float MaxText storage of integer HF values (tid2eid): exact only if every value is a whole number
            if not np.array_equal(x, np.round(x)):
                raise CkptflowError(
                    f"{self.hf}: MaxText values are not whole numbers, cannot be written as {self.hf_dtype}"
                )
            return x.astype(self.hf_dtype)
        return x


@dataclass(frozen=True)
class LayerGroup:
    """Rules repeated over `hf_layers`: stacked under `stacked` when scanning, else one prefix per layer.

    `stack`: the sizes of the stacked axes of a nested stack (outermost first, from SCAN_AXIS on), whose product
    is len(hf_layers), `hf_layers` then being row-major over them; None: one stacked axis of len(hf_layers).
    A nested stack needs arrays of at least SCAN_AXIS axes per layer (experts included): MaxText leaves the scan
    axis of an array with fewer at 0, which for two scans gives the inner axis first (`nnx_scan.py`).
    """

    rules: tuple[Rule, ...]
    hf_layers: tuple[int, ...]
    stacked: str | None
    unstacked: tuple[str, ...]
    stack: tuple[int, ...] | None = None

    def __post_init__(self):
        assert self.stack is None or int(np.prod(self.stack)) == len(self.hf_layers), (self.stack, len(self.hf_layers))


@dataclass(frozen=True)
class Piece:
    """One HF tensor (or one expert row of a fused one) and the region of a MaxText array it fills."""

    index: tuple  # ints pick the expert / layer slice; () is the whole array
    hf: str
    row: int | None = None  # expert row of a fused HF expert tensor; None: the whole tensor


@dataclass(frozen=True)
class Leaf:
    """One MaxText array and the HF tensors that fill it."""

    path: str
    rule: Rule
    hf_layers: tuple[int, ...] | None = None  # stacked from SCAN_AXIS on, one entry per slice (row-major)
    hf_layer: int | None = None  # an unstacked layer's HF index
    split_index: int = 0  # which output of the rule's split this array is
    split_paths: tuple[str, ...] = ()  # split rules: the paths of all arrays cut from the same HF tensors, in order
    stack: tuple[int, ...] | None = None  # a nested stack's axis sizes (LayerGroup.stack); None: (len(hf_layers),)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The sizes of the stacked axes, which start at SCAN_AXIS (() when unstacked)."""
        if self.hf_layers is None:
            return ()
        return self.stack if self.stack is not None else (len(self.hf_layers),)

    @property
    def shape(self) -> tuple[int, ...]:
        r = self.rule
        s = r.part_shapes[self.split_index] if r.part_shapes else r.mt_shape
        if r.experts:
            s = (r.experts,) + s
        if self.hf_layers is None:
            return s
        a = r.scan_axis
        return s[:a] + self.stack_shape + s[a:]

    def layer_at(self, index: tuple) -> int | None:
        """The HF layer of the piece at `index` (a `Piece.index`)."""
        if self.hf_layers is None:
            return self.hf_layer
        k, a = len(self.stack_shape), self.rule.scan_axis
        return self.hf_layers[int(np.ravel_multi_index(tuple(index[a : a + k]), self.stack_shape))]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor this leaf reads (a fused expert tensor has all experts)."""
        r = self.rule
        return (r.experts,) + r.hf_shape if r.fused_experts else r.hf_shape

    @property
    def row_streamed(self) -> bool:
        """A single 2-D tensor streamed in row blocks (embedding, lm_head) rather than as pieces."""
        return self.rule.row_axis is not None and self.hf_layers is None and not self.rule.experts

    @property
    def piece_shape(self) -> tuple[int, ...]:
        """The region one piece fills: the array with its expert and layer axes cut to 1 (chunk shape)."""
        s = list(self.shape)
        if self.rule.experts:
            s[0] = 1
        for a in range(len(self.stack_shape)):
            s[self.rule.scan_axis + a] = 1
        return tuple(s)

    def hf_name(self, layer: int | None = None, expert: int | None = None) -> str:
        if layer is None:
            layer = self.hf_layer
        return self.rule.hf.format(i=layer, e=expert) if "{" in self.rule.hf else self.rule.hf

    def pieces(self) -> list[Piece]:
        """Every piece of this array, layer by layer and expert by expert within a layer (none for a `fill` array,
        which no HF tensor fills)."""
        r = self.rule
        if r.fill is not None:
            return []
        layers = list(enumerate(self.hf_layers)) if self.hf_layers is not None else [(None, self.hf_layer)]
        out = []
        for j, layer in layers:
            for e in range(r.experts) if r.experts else [None]:
                index: list = [slice(None)] * len(self.shape)
                if e is not None:
                    index[0] = e
                if j is not None:
                    at = np.unravel_index(j, self.stack_shape)  # one index per stacked axis
                    index[r.scan_axis : r.scan_axis + len(at)] = [int(a) for a in at]
                while index and index[-1] == slice(None):
                    index.pop()
                out.append(Piece(tuple(index), self.hf_name(layer, e), e if r.fused_experts else None))
        return out

    def hf_tensors(self) -> list[tuple[str, list[Piece]]]:
        """Each HF tensor this leaf fills, once, with its pieces in the tensor's row order."""
        by_name: dict[str, list[Piece]] = {}
        for p in self.pieces():
            by_name.setdefault(p.hf, []).append(p)
        return list(by_name.items())

    def hf_names(self) -> list[tuple[tuple | None, str]]:
        """(region of the first piece, or None for the whole array; HF tensor name) per HF tensor of this leaf."""
        return [(ps[0].index or None, name) for name, ps in self.hf_tensors()]


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


# Config keys that size arrays: when present (and not null) each must be a positive integer.
DIMENSION_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "num_hidden_layers",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "experts_per_token",
)


def check_dimensions(cfg: dict, family: str) -> None:
    """Refuse a config whose array sizes are not positive integers (a string, a list, 0, -1), naming the key."""
    for where, c in (("", cfg), ("text_config.", cfg.get("text_config"))):
        if not isinstance(c, dict):
            continue
        for key in DIMENSION_KEYS:
            v = c.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise CkptflowError(
                    f"config.json for a {family} model: {where}{key} must be a positive integer, got {v!r}"
                )


def require(cfg: dict, key: str, family: str):
    if key not in cfg or cfg[key] is None:
        raise CkptflowError(f"config.json for a {family} model is missing {key!r}")
    return cfg[key]


class Family:
    """Base class of a model family. Subclasses are data: names, configs and rule lists."""

    name: ClassVar[str]  # ckptflow family name, e.g. "llama3.1"
    model_types: ClassVar[tuple[str, ...]]  # HF config `model_type`s this family converts
    # HF `architectures` this family converts (a causal LM, or Gemma3's conditional generation); the first is
    # written on export. A config naming another class (e.g. a sequence classifier) is refused.
    architectures: ClassVar[tuple[str, ...]]
    # Its JAX reference of what MaxText computes, "module:Class" (imported only by verify: it needs JAX).
    # Every registered family has one (tests/core/test_registry.py).
    reference: ClassVar[str]
    # Tiny random test models (converters/tiny_models.py): test model name -> (a model of `models` whose config is
    # shrunk, the dimensions that replace its own). Every registered family has at least one.
    test_models: ClassVar[dict[str, tuple[str, dict]]]
    models: ClassVar[dict[str, dict]]  # MaxText model name -> its published HF config.json
    ignored_hf: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq",)  # HF tensors never read
    # (name prefix the rules use, prefix some writers use instead): a source without the first but with the
    # second is read under the rules' names (e.g. transformers >= 5 saves Gemma3's `vision_tower.vision_model.*`
    # as `vision_tower.*`). Export always writes the rules' names.
    hf_aliases: ClassVar[tuple[tuple[str, str], ...]] = ()
    # (regex of a name another writer uses, the rules' name as its replacement): renamed when the source has no tensor
    # of the replaced name already (transformers saves DeepSeek-V4's `attn.kv_norm` as `attn.norm`)
    hf_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # MaxText builds (and loads) a scanned tree of this block; False: unscanned only, `layer_groups` refuses scan with
    # the reason (Gemma 4 small), and `ckptflow models` lists the unscanned directions only
    scannable: ClassVar[bool] = True

    # ---- to override -------------------------------------------------------------------------------
    @classmethod
    def accepts(cls, cfg: dict) -> bool:
        """Whether this family converts `cfg`, among the families that share its `model_type` (Gemma 4's
        `gemma4_text`: the dense/MoE block or, with per-layer inputs, the small one). The registry asks the families
        of a model type in order and takes the first that accepts; a family refuses what it cannot convert in `dims`,
        with the reason. Default: every config of its model types."""
        return True

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
        return [
            LayerGroup(
                tuple(cls.layer_rules(d)),
                tuple(range(n)),
                "decoder/layers",
                tuple(f"decoder/layers_{i}" for i in range(n)),
            )
        ]

    @classmethod
    def hf_fusions(cls, d: Dims) -> list[Fusion | Slices]:
        """HF tensors stored as several that the rules read as one (`Fusion`), or stored as one that the rules read as
        several (`Slices`); none by default."""
        return []

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        """Regexes of HF tensors that exist in checkpoints but are not converted (e.g. a tied lm_head)."""
        out = list(cls.ignored_hf)
        if d.tied:
            out.append(r"lm_head\.weight")
        return out

    @classmethod
    def optional_groups(cls, d: Dims) -> dict[str, list[LayerGroup]]:
        """Parts converted only on request (`plan(..., extras=(name,))`), e.g. DeepSeek-V3's multi-token-prediction
        layer (`--with-mtp`); always unstacked. Their HF tensors are otherwise among `ignored`. Default: none."""
        return {}

    @classmethod
    def legacy_layouts(cls, d: Dims) -> dict[str, list[LayerGroup]]:
        """Scanned layouts that older writers used and MaxText no longer loads: name -> the layer groups that replace
        `layer_groups(d, True)` (`plan(..., legacy=name)`). Read (export, verify), never written. Default: none."""
        return {}

    @classmethod
    def config_for_checkpoint(cls, cfg: dict, stored: set[str]) -> dict:
        """The config to export a checkpoint with, given its stored array paths (e.g. a Gemma3 checkpoint
        trained without the vision tower exports as the text-only model). Default: `cfg` as is."""
        return cfg

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        """The config.json written on export: the source config with what the conversion changed."""
        out = {k: v for k, v in cfg.items() if k not in ("quantization_config", "_name_or_path", "torch_dtype")}
        out["architectures"] = list(cfg.get("architectures") or cls.architectures[:1])
        out["dtype"] = dtype
        return out

    # ---- derived --------------------------------------------------------------------------------
    @classmethod
    def plan(cls, cfg: dict, scan: bool, extras: tuple[str, ...] = (), legacy: str | None = None) -> list[Leaf]:
        """The leaves of the model `cfg`, scanned or not, with the optional groups `extras`; `legacy`: the scanned
        layout of that name among `legacy_layouts` instead of the current one (reading old checkpoints)."""
        check_dimensions(cfg, cls.name)
        try:
            d = cls.dims(cfg)
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # a value of the wrong kind elsewhere
            raise CkptflowError(
                f"config.json for a {cls.name} model has a value of the wrong type or range: {e}"
            ) from None
        leaves = [leaf for r in cls.global_rules(d) for leaf in _leaves(r, "")]
        optional = cls.optional_groups(d) if extras else {}
        unknown = [x for x in extras if x not in optional]
        if unknown:
            raise CkptflowError(f"a {cls.name} model with this config.json has no {', '.join(unknown)} to convert")
        if legacy is not None:
            layouts = cls.legacy_layouts(d)
            if not scan or legacy not in layouts:
                raise CkptflowError(f"a {cls.name} model has no scanned layout {legacy!r}")
            groups = layouts[legacy]
        else:
            groups = cls.layer_groups(d, scan)
        for g in [*groups, *(g for x in extras for g in optional[x])]:
            for r in g.rules:
                if scan and g.stacked is not None:
                    nested_ok = g.stack is None or len(r.mt_shape) + bool(r.experts) >= r.scan_axis
                    assert nested_ok, f"{r.hf}: a nested stack of arrays with fewer than SCAN_AXIS axes"
                    leaves.extend(_leaves(r, f"{g.stacked}/", hf_layers=g.hf_layers, stack=g.stack))
                else:
                    leaves.extend(
                        leaf for p, l in zip(g.unstacked, g.hf_layers) for leaf in _leaves(r, f"{p}/", hf_layer=l)
                    )
        paths = [l.path for l in leaves]
        dupes = {p for p in paths if paths.count(p) > 1}
        assert not dupes, f"{cls.name}: duplicate MaxText paths {sorted(dupes)}"
        return leaves

    @classmethod
    def is_ignored(cls, d: Dims, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in cls.ignored(d))


def _leaves(r: Rule, prefix: str, **where) -> list[Leaf]:
    """The array(s) of one rule under `prefix`: one, or one per part of a split."""
    if r.split is None:
        return [Leaf(prefix + r.mt, r, **where)]
    paths = tuple(prefix + m for m in r.mt)
    assert len(paths) == r.split.n, f"{r.hf}: {len(paths)} MaxText paths for a {r.split.n}-way split"
    return [Leaf(p, r, split_index=k, split_paths=paths, **where) for k, p in enumerate(paths)]
