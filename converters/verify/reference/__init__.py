"""JAX reference forward pass of a MaxText checkpoint, one module per family, run one layer at a time.

A family's reference is a `Forward` subclass (see `common.py`) in its own module here; the conversion family
names it (`Family.reference` in `converters/families/`), so the one registry, `converters.core.registry`,
also says which reference verifies which family (docs/adding-a-family.md).

`Reference` is what verification runs: it never holds the checkpoint. Its caller reads what each stage needs
(`global_keys`, the embedding rows of the prompts' ids, `layer_reads(l)`, `expert_reads(l, e)`, vocabulary blocks
of the output projection) and hands the arrays over; the reference keeps only the prompts' activations.
`ReferenceModel` runs the same stages on an in-memory tree of arrays (tests, small models).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from converters.core.mapping import Family as FamilySpec
from converters.errors import CkptflowError
from converters.verify.reference.common import (
    DTYPES,
    EMBEDDING,
    LOGITS_KERNEL,
    Forward,
    ModelSpec,
    Params,
    Shapes,
    hf_config_object,
)


def forward_of(family: type[FamilySpec]) -> Forward:
    """The reference forward pass a conversion family declares (`Family.reference`, "module:Class")."""
    return _load_forward(family.reference)


@functools.lru_cache(maxsize=None)
def _load_forward(path: str) -> Forward:
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Forward)):
        raise TypeError(f"{path} is not a reference Forward class")
    return cls()


def forward_for(model_type: str, config: dict | None = None) -> Forward:
    """The reference forward pass of the family that converts `model_type` (UnsupportedModelError if none); `config`
    (the config.json dict) picks among families sharing the model type (`Family.accepts`)."""
    from converters.core import registry

    return forward_of(registry.family_for_model_type(model_type, config))


@functools.lru_cache(maxsize=None)
def _jitted(family: Forward, stage: str):
    """One compiled function per family and stage; recompiled only per shape / dtype."""
    import jax

    return jax.jit(getattr(family, stage), static_argnums=0)


def _astype(dtype, tree: dict) -> dict:
    return {k: v.astype(dtype) for k, v in tree.items()}


def _cast_tree(dtype, tree: dict) -> dict:
    """Device arrays cast to `dtype` by one compiled function (XLA's cast, on every core)."""
    import jax

    global _cast_jit
    if _cast_jit is None:
        _cast_jit = jax.jit(_astype, static_argnums=0)
    return _cast_jit(dtype, tree)


_cast_jit = None


def _padded(n: int) -> int:
    """Token counts an expert is compiled for: powers of two, so a layer compiles a handful of shapes, not one per
    count."""
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class PromptState:
    """One prompt's activations between stages (device arrays in the compute dtype)."""

    x: object
    positions: object
    extra: dict = field(default_factory=dict)  # per-prompt block inputs (Gemma3's image blocks)
    h: object = None  # MoE layers: the experts' input
    weights: np.ndarray | None = None  # MoE layers: [T, E] routing weights


class Reference:
    """What MaxText computes for a checkpoint, in one compute dtype, one decoder layer at a time.

    config: the HF config.json dict describing the model; shapes: checkpoint key ('/'-joined path under
    `params/params`) -> stored shape, for every array (structure and sizes are checked up front).
    """

    def __init__(self, config: dict, shapes: Shapes, *, dtype: str = "float32", bf16_tied_logits: bool = False):
        if dtype not in DTYPES:
            raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        cfg = hf_config_object(config)
        self.forward = forward_for(cfg.model_type, config)
        spec = dataclasses.replace(self.forward.make_spec(cfg), dtype=dtype)
        # bf16_tied_logits: reproduce MaxText's bfloat16 cast of the tied embedding table in the logits matmul
        # also in float32 runs (see Forward.logits_block).
        self.spec: ModelSpec = spec.with_options(bf16_tied_logits=bool(bf16_tied_logits))
        self.warnings: list[str] = self.forward.config_warnings(cfg)
        self.layout = self.forward.detect_layout(self.spec, shapes)
        self.forward.check_params(self.spec, shapes, self.layout)
        self.warnings += self.forward.layout_warnings(self.spec, self.layout)
        emb = tuple(shapes[EMBEDDING])
        if len(emb) != 2 or emb[1] != self.spec.hidden_size or emb[0] < self.spec.vocab_size:
            raise CkptflowError(
                f"token_embedder/embedding has shape {emb}; expected [>= {self.spec.vocab_size}, "
                f"{self.spec.hidden_size}] for this config"
            )
        self.vocab_size = int(emb[0])  # may be padded beyond the HF vocabulary
        self.num_layers = self.layout.num_layers

    @property
    def scanned(self) -> bool:
        return self.layout.scanned

    @property
    def tied(self) -> bool:
        return self.spec.tie_word_embeddings

    @property
    def head_key(self) -> str:
        """The array the logits are computed from: rows of the tied embedding, or columns of the logits kernel."""
        return EMBEDDING if self.tied else LOGITS_KERNEL

    # ---- what to read ---------------------------------------------------------------------------------
    norm_keys = ("decoder/decoder_norm/scale",)  # what `final` uses

    @property
    def global_keys(self) -> list[str]:
        """Arrays read whole before the layers (final norm, vision tower); the embedding and the logits kernel are
        read in pieces (`prompt`, `logits`)."""
        return [k for k in self.forward.global_keys(self.spec) if k not in (EMBEDDING, LOGITS_KERNEL, *self.row_keys)]

    @property
    def row_keys(self) -> list[str]:
        """Tables besides the embedding of which `prompt` needs only the rows of the prompts' ids (sorted, unique, as
        the embedding's rows), in its global arrays `g`."""
        return list(self.forward.row_keys(self.spec))

    def layer_reads(self, l: int) -> dict[str, tuple[str, tuple]]:
        return self.forward.layer_reads(self.spec, self.layout, l)

    def expert_reads(self, l: int, e: int) -> dict[str, tuple[str, tuple]]:
        return self.forward.expert_reads(self.spec, self.layout, l, e)

    def is_moe(self, l: int) -> bool:
        return bool(self.forward.moe_arrays(self.spec, l))

    def hf_layers(self, l: int) -> tuple[int, ...]:
        return self.forward.hf_layers(self.spec, l)

    # ---- stages -----------------------------------------------------------------------------------------
    def _cast(self, arrays: dict) -> dict:
        """Arrays as stored -> device arrays in the compute dtype (MaxText casts each weight where it uses it; once per
        layer here, by XLA: half the time of a host-side cast, and every prompt reuses it)."""
        import jax.numpy as jnp

        return _cast_tree(self.spec.jdtype, {k: jnp.asarray(np.asarray(v)) for k, v in arrays.items()})

    def prompt(
        self, rows: np.ndarray, index: np.ndarray, token_ids, g: dict, inputs: dict | None = None
    ) -> PromptState:
        """The first layer's input: `rows` of the embedding (stored dtype) and `index` into them per position;
        `inputs`: a multimodal prompt's extra model inputs (pixel values)."""
        import jax.numpy as jnp

        ids = np.asarray(token_ids, np.int32)
        positions = jnp.arange(ids.shape[0], dtype=jnp.int32)
        if inputs:
            x, extra = self.forward.multimodal_embed(
                self.spec, self._cast(g), jnp.asarray(rows), jnp.asarray(index), ids, inputs
            )
            return PromptState(x, positions, extra)
        x = _jitted(self.forward, "embed")(self.spec, jnp.asarray(rows), jnp.asarray(index, jnp.int32))
        return PromptState(x, positions, self.forward.prompt_extra(self.spec, g, np.asarray(index), x))

    def layer(
        self,
        l: int,
        arrays: dict[str, np.ndarray],
        states: list[PromptState],
        experts: Callable[[int], dict] | None = None,
    ) -> None:
        """Run layer l on every prompt. arrays: `layer_reads(l)` keys -> arrays as stored; experts(e) -> expert e's
        `expert_reads(l, e)` arrays (MoE layers: called once per expert some token is routed to, in ascending order)."""
        import jax

        p = self._cast(arrays)
        p.update(self.forward.layer_markers(self.spec, l))
        if not self.is_moe(l):
            block = _jitted(self.forward, "block")
            for s in states:
                out = block(self.spec, p, s.x, s.positions, **s.extra)
                if isinstance(out, tuple):  # (x, state for later layers): Gemma 4 small's shared K/V
                    s.x, s.extra = out[0], {**s.extra, **out[1]}
                else:
                    s.x = out
            # JAX dispatches asynchronously: wait, so the layer's weights are gone when this returns (not while the
            # next side loads its own) and the time is counted where it is spent
            jax.block_until_ready([s.x for s in states])
            return
        pre, route = _jitted(self.forward, "pre_moe"), _jitted(self.forward, "route")
        for s in states:
            s.x, s.h, *router_input = pre(self.spec, p, s.x, s.positions, **s.extra)
            s.weights = np.asarray(route(self.spec, p, *(router_input or [s.h])), np.float32)
        routed = self._experts(states, experts)
        post = _jitted(self.forward, "post_moe")
        for s, y in zip(states, routed):
            s.x = post(self.spec, p, s.x, s.h, y)
            s.h = s.weights = None
        jax.block_until_ready([s.x for s in states])

    def _experts(self, states: list[PromptState], experts: Callable[[int], dict]) -> list:
        """Every expert some token is routed to, one at a time, on exactly those tokens (all prompts at once); the
        outputs summed with the routing weights in float32, then cast to the compute dtype."""
        import jax.numpy as jnp

        run = _jitted(self.forward, "expert")
        acc = [np.zeros(np.shape(s.h), np.float32) for s in states]
        hs = [np.asarray(s.h.astype(jnp.float32)) for s in states]
        hit = sorted(set().union(*(np.flatnonzero(s.weights.any(axis=0)) for s in states)))
        for e in hit:
            w = {rel.rsplit("/", 1)[-1]: v for rel, v in self._cast(experts(e)).items()}
            rows = [np.flatnonzero(s.weights[:, e]) for s in states]
            n = sum(len(r) for r in rows)
            tokens = np.zeros((_padded(n), hs[0].shape[1]), np.float32)
            tokens[:n] = np.concatenate([h[r] for h, r in zip(hs, rows)])
            out = np.asarray(run(self.spec, w, jnp.asarray(tokens, self.spec.jdtype)).astype(jnp.float32))
            at = 0
            for a, s, r in zip(acc, states, rows):
                a[r] += out[at : at + len(r)] * s.weights[r, e][:, None]
                at += len(r)
        return [jnp.asarray(a, self.spec.jdtype) for a in acc]

    def final(self, g: dict, states: list[PromptState]) -> None:
        norm = _jitted(self.forward, "final_norm")
        gj = self._cast(g)
        for s in states:
            s.x = norm(self.spec, gj, s.x)

    def logits(self, states: list[PromptState], w: np.ndarray) -> list[np.ndarray]:
        """float32 logits of one vocabulary block for each prompt: `w` is `head_key`'s rows (tied, `[Vb, E]`) or
        columns (`[E, Vb]`), as stored."""
        import jax.numpy as jnp

        run, w = (
            _jitted(self.forward, "logits_block"),
            _cast_tree(self.spec.jdtype, {"w": jnp.asarray(np.asarray(w))})["w"],
        )
        return [np.asarray(run(self.spec, s.x, w)) for s in states]


# Vocabulary block of `ReferenceModel.logits`; any size gives the same logits, bit for bit.
VOCAB_BLOCK = 8192


class ReferenceModel:
    """`Reference` on an in-memory tree: params are the checkpoint's arrays keyed by '/'-joined paths under
    `params/params` (`converters.io.orbax.read_params`); config: the HF config.json dict describing the model."""

    def __init__(self, params: Params, config: dict, *, dtype: str = "float32", bf16_tied_logits: bool = False):
        self.ref = Reference(
            config, {k: tuple(np.shape(v)) for k, v in params.items()}, dtype=dtype, bf16_tied_logits=bf16_tied_logits
        )
        self.params = params
        self.forward, self.spec, self.layout, self.warnings = (
            self.ref.forward,
            self.ref.spec,
            self.ref.layout,
            self.ref.warnings,
        )
        self.vocab_size = self.ref.vocab_size

    @property
    def scanned(self) -> bool:
        return self.ref.scanned

    def _read(self, key: str, index: tuple) -> np.ndarray:
        return np.asarray(self.params[key][index])

    def logits(self, token_ids, inputs: dict | None = None) -> np.ndarray:
        """float32 logits `[T, V_checkpoint]` for the given ids (positions 0..T-1, one segment); `inputs`: a
        multimodal prompt's pixel values (`{"pixel_values": ...}`)."""
        ref = self.ref
        ids = np.clip(np.asarray(token_ids, np.int64), 0, ref.vocab_size - 1)
        uniq, index = np.unique(ids, return_inverse=True)
        g = {k: self.params[k] for k in ref.global_keys} | {k: self._read(k, (uniq,)) for k in ref.row_keys}
        state = ref.prompt(self._read(EMBEDDING, (uniq,)), index, token_ids, g, inputs)
        for l in range(ref.num_layers):
            arrays = {rel: self._read(*at) for rel, at in ref.layer_reads(l).items()}
            ref.layer(
                l, arrays, [state], lambda e, l=l: {rel: self._read(*at) for rel, at in ref.expert_reads(l, e).items()}
            )
        ref.final({k: g[k] for k in ref.norm_keys}, [state])
        head = self.params[ref.head_key]
        blocks = []
        for v0 in range(0, ref.vocab_size, VOCAB_BLOCK):
            cols = slice(v0, min(v0 + VOCAB_BLOCK, ref.vocab_size))
            blocks += ref.logits([state], head[cols] if ref.tied else head[:, cols])
        return np.concatenate(blocks, axis=1)


__all__ = [
    "Forward",
    "ModelSpec",
    "PromptState",
    "Reference",
    "ReferenceModel",
    "forward_for",
    "forward_of",
]
