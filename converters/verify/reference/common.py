"""Shared pieces of the JAX reference forward pass: the model spec, MaxText's numerics, the family base.

This is a *reference* implementation of what MaxText computes for a checkpoint: it reads the Orbax
arrays exactly as MaxText lays them out and applies the same operations, in the same order and at
the same precision, as MaxText's layers (`src/maxtext/layers/{normalizations,linears,attentions,
attention_op,embeddings}.py`, `src/maxtext/layers/decoders.py`). It does not import MaxText.
Clarity beats speed: a single unbatched sequence `[T, ...]`, one jitted function per decoder block.

Precision model (MaxText defaults `weight_dtype=float32`, `dtype=<compute dtype>`):
  * weights are cast to the compute dtype right before use (DenseGeneral / Embed / RMSNorm);
  * RMSNorm computes the statistics in float32, casts the normalized value to the compute dtype and
    multiplies by the scale in the compute dtype;
  * attention scores are computed from compute-dtype q/k; the softmax runs in float32 (what the
    flash/splash kernels MaxText selects on accelerators do; irrelevant in float32 mode);
  * logits are cast to float32 at the end (`cast_logits_to_fp32: true`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from converters.errors import CkptflowError, UnsupportedModelError  # noqa: E402

jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# MaxText masks with a large finite negative (DEFAULT_MASK_VALUE = -0.7 * float32 max).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------------
# Model spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything the forward pass needs to know about the architecture (hashable: a jit static arg)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
    # Forward-specific options as sorted (key, value) pairs, e.g. (("rope_scaling", (...)),).
    options: tuple = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def with_options(self, **kwargs) -> "ModelSpec":
        merged = {**dict(self.options), **kwargs}
        return dataclasses.replace(self, options=tuple(sorted(merged.items())))

    @property
    def jdtype(self):
        return DTYPES[self.dtype]


def hf_config_object(config: dict):
    """The transformers config object for a config.json dict (no remote code, ever).

    Using transformers' own config classes gives exactly the defaults and the rope-parameter
    normalization the HF model uses (e.g. Qwen3's default head_dim=128 even when hidden/heads
    differs, legacy `rope_theta`/`rope_scaling` vs `rope_parameters`).
    """
    from transformers import CONFIG_MAPPING  # local import: heavy

    from converters.families.deepseek import as_transformers_builds_it

    config = as_transformers_builds_it(config)  # Kimi-K2's kimi_k2 is DeepSeek-V3 under its own name
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(f"unknown model_type {model_type!r} in config.json")
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as e:  # transformers raises several kinds on invalid configs
        raise CkptflowError(f"invalid {model_type} config.json: {e}") from None


def rope_parameters(cfg) -> dict:
    """The standardized rope parameters of a transformers config ({'rope_type','rope_theta',...})."""
    rp = getattr(cfg, "rope_parameters", None)
    if rp is None:  # older transformers
        rp = dict(getattr(cfg, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rp = dict(rp)
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def base_spec(cfg, **overrides) -> dict:
    """Fields common to the Llama-like families, read from a transformers config object."""
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
    fields = dict(
        model_type=cfg.model_type,
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        intermediate_size=int(cfg.intermediate_size),
        norm_eps=float(cfg.rms_norm_eps),
        rope_theta=float(rope_parameters(cfg)["rope_theta"]),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return fields


def require(cond: bool, what: str) -> None:
    """Reject configurations MaxText's block for this family cannot express."""
    if not cond:
        raise UnsupportedModelError(f"not supported by the MaxText reference: {what}")


# --------------------------------------------------------------------------------------------
# Numerics shared by the families (MaxText semantics)
# --------------------------------------------------------------------------------------------


def rms_norm(x, scale, eps: float, dtype):
    """MaxText RMSNorm: float32 statistics, normalized value cast to `dtype`, times scale in `dtype`."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return y.astype(dtype) * scale.astype(dtype)


def dense(x, kernel, dtype, contract: int = 1, bias=None):
    """DenseGeneral: contract the last `contract` axes of x with the first of kernel, in `dtype`."""
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    y = jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ())))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def rope_halves(x, positions, theta: float, dtype):
    """MaxText `RotaryEmbedding` (Qwen, Gemma): pairs (i, i + D/2), sin/cos cast to the input dtype.

    x: [T, H, D]; positions: [T].
    """
    d = x.shape[-1]
    timescale = theta ** (2 * jnp.arange(d // 2, dtype=jnp.float32) / d)
    angle = positions.astype(jnp.float32)[:, None, None] / timescale  # [T, 1, D/2]
    sin = jnp.sin(angle).astype(x.dtype)
    cos = jnp.cos(angle).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)


def causal_attention(q, k, v, dtype, *, chunk: int | None = None):
    """Causal grouped-query attention (MaxText dot-product semantics, softmax in float32).

    q: [T, N, D] (already scaled as the family requires), k, v: [S, K, D]. Query head n uses kv head
    n // (N/K), the grouping MaxText's `btkgd` reshape implies. With `chunk` (MaxText's AttentionType.CHUNK,
    Llama 4) a query sees only the keys of its own chunk of `chunk` positions. Returns [T, N, D] in `dtype`.
    """
    t, n, d = q.shape
    kv = k.shape[1]
    g = n // kv
    qg = q.reshape(t, kv, g, d)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k).astype(jnp.float32)
    qi, kj = jnp.arange(t)[:, None], jnp.arange(k.shape[0])[None, :]
    causal = qi >= kj
    if chunk:
        causal = causal & (qi // chunk == kj // chunk)
    scores = jnp.where(causal[None, None], scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("kgts,skd->tkgd", weights, v.astype(dtype))
    return out.reshape(t, n, d).astype(dtype)


def gated_mlp(x, wi_0, wi_1, wo, dtype, activation: Callable = jax.nn.silu):
    """MaxText MlpBlock with activations ("silu", "linear"): wo(act(x @ wi_0) * (x @ wi_1))."""
    gate = activation(dense(x, wi_0, dtype))
    up = dense(x, wi_1, dtype)
    return dense((gate * up).astype(dtype), wo, dtype)


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

Params = dict[str, np.ndarray]
Shapes = dict[str, tuple]  # checkpoint key -> stored shape


@dataclass
class Layout:
    """Where the decoder layers live in the checkpoint."""

    scanned: bool
    num_layers: int
    scan_axis: int = 1
    legacy: str | None = None  # an older writer's scanned layout (`Family.legacy_layouts`), read all the same


def _stack_index(j: int | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A `layer_location` index as one index per stacked axis."""
    return None if j is None else (j,) if isinstance(j, int) else tuple(j)


# Layer arrays shared by the Llama-style blocks (under `decoder/layers[_i]/`).
ATTENTION_KEYS = (
    "pre_self_attention_layer_norm/scale",
    "self_attention/query/kernel",
    "self_attention/key/kernel",
    "self_attention/value/kernel",
    "self_attention/out/kernel",
    "post_self_attention_layer_norm/scale",
)
GATED_MLP_KEYS = ("mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel")
EMBEDDING = "token_embedder/embedding"
LOGITS_KERNEL = "decoder/logits_dense/kernel"


class Forward:
    """One MaxText decoder family. Subclasses implement `make_spec`, `layer_keys` and `block`.

    The reference runs one decoder layer at a time (`converters.verify.reference.Reference`): the embedding rows
    of the prompt's ids, then `block` per layer on that layer's arrays, then `final_norm` and the logits one
    vocabulary block at a time (`logits_block`). The default covers Llama-like models: a token embedding, a
    stack of homogeneous blocks (scanned under `decoder/layers/...` with the layer axis at `param_scan_axis`=1,
    or unscanned under `decoder/layers_<i>/...`), a final RMSNorm, and logits via `logits_dense` or the tied
    embedding. Families with other layer groupings (Gemma2 pairs, Gemma3 6-blocks + remainder, MoE stacks)
    override `layer_location` / `keys_of_layer`.

    Mixture-of-experts layers stream their experts: `moe_arrays(spec, l)` names the routed-expert arrays of
    layer l (`[E, ...]`, scanned `[E, L, ...]`), which are read one expert at a time, and the layer is computed
    as `pre_moe` (everything before the experts) -> `route` (`[T, E]` weights, zero where a token does not go)
    -> `expert` per expert on the tokens routed to it, summed with the weights in float32 (MaxText's
    `float32_weight_sum`) -> `post_moe` (residual, shared experts).
    """

    # Layout check threshold: max per-token KL between the HF model on the checkpoint's values and this reference
    # on the checkpoint, both in float32. A correct conversion differs only in accumulation order (measured on the
    # tiny test models: < 1e-9; PyTorch and XLA sum in different orders); the mapping errors an inverse would
    # hide (RoPE layout, a transposition, a scale applied twice) are >= 1e-3 even on 4-token prompts.
    layout_max_kl: float = 1e-5

    # ---- to implement ------------------------------------------------------------------------
    def make_spec(self, cfg) -> ModelSpec:
        raise NotImplementedError

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        """Checkpoint keys of one decoder layer, relative to `decoder/layers[_i]/`."""
        raise NotImplementedError

    def block(self, spec: ModelSpec, p: dict, x, positions):
        """One decoder block. p: layer_keys → arrays; x: [T, E] (compute dtype); positions: [T]."""
        raise NotImplementedError

    # ---- defaults (override where a family differs) -----------------------------------------
    def config_warnings(self, cfg) -> list[str]:
        """Config values MaxText would not honour (the reference follows MaxText; the user should know)."""
        return []

    def global_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        keys = [EMBEDDING, "decoder/decoder_norm/scale"]
        if not spec.tie_word_embeddings:
            keys.append(LOGITS_KERNEL)
        return tuple(keys)

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        scanned = any(k.startswith("decoder/layers/") for k in keys)
        unscanned = any(k.startswith("decoder/layers_") for k in keys)
        if scanned and unscanned:
            raise CkptflowError(
                "checkpoint has both scanned (decoder/layers/) and unscanned (decoder/layers_<i>/) layers"
            )
        if not scanned and not unscanned:
            raise CkptflowError("checkpoint has no decoder layers (neither decoder/layers/ nor decoder/layers_0/)")
        return Layout(scanned=scanned, num_layers=spec.num_layers)

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | tuple[int, ...] | None]:
        """(key prefix, index along the scan axis or None) of decoder layer l. Families whose layers stack
        differently (blocks, interleaved or separate stacks) override this and nothing else. A nested stack (several
        stacked axes from the scan axis on, see `converters.core.mapping`) gives a tuple, one index per axis."""
        return ("decoder/layers", l) if layout.scanned else (f"decoder/layers_{l}", None)

    def layout_warnings(self, spec: ModelSpec, layout: Layout) -> list[str]:
        """What to tell the user about the stored layout (e.g. an older one MaxText does not load)."""
        return []

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        """The arrays of layer l, routed experts included (families with several kinds of layer override this)."""
        return self.layer_keys(spec)

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        """The routed-expert arrays among `keys_of_layer(spec, l)` (read one expert at a time); () for dense layers."""
        return ()

    def hf_layers(self, spec: ModelSpec, l: int) -> tuple[int, ...]:
        """The HF decoder layers stored layer l holds (Gemma2: a pair)."""
        return (l,)

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        """Extra zero-size entries that tell `block` the kind of layer l at trace time (e.g. local/global)."""
        return {}

    def check_params(self, spec: ModelSpec, shapes: Shapes, layout: Layout) -> None:
        """Fail early, with the key name, on a missing or wrongly shaped array (`shapes`: key -> stored shape)."""
        located = (self.layer_location(spec, layout, l) for l in range(layout.num_layers))
        where = [(prefix, _stack_index(j)) for prefix, j in located]
        depth: dict[str, tuple[int, ...]] = {}  # prefix -> the sizes of its stacked axes
        for prefix, j in where:
            if j is not None:
                depth[prefix] = tuple(max(a + 1, b) for a, b in zip(j, depth.get(prefix, (0,) * len(j))))
        missing = [k for k in self.global_keys(spec) if k not in shapes]
        for l, (prefix, j) in enumerate(where):
            for rel in self.keys_of_layer(spec, l):
                key = f"{prefix}/{rel}"
                axis = layout.scan_axis  # routed experts too: [E, L, ...]
                if key not in shapes:
                    missing.append(key)
                elif j is not None and tuple(shapes[key][axis : axis + len(j)]) != depth[prefix]:
                    n = " x ".join(map(str, depth[prefix]))
                    raise CkptflowError(
                        f"scanned tensor {key} has shape {tuple(shapes[key])}; expected {n} layers on axis {axis}"
                        + (f"..{axis + len(j) - 1}" if len(j) > 1 else "")
                    )
        if missing:
            missing = list(dict.fromkeys(missing))
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CkptflowError(f"checkpoint is missing {', '.join(missing[:5])}{more}")
        if not layout.scanned:
            prefix, _ = self.layer_location(spec, layout, layout.num_layers)
            if f"{prefix}/{self.keys_of_layer(spec, layout.num_layers - 1)[0]}" in shapes:
                raise CkptflowError(f"checkpoint has more than the {layout.num_layers} layers the config declares")

    def layer_reads(self, spec: ModelSpec, layout: Layout, l: int) -> dict[str, tuple[str, tuple]]:
        """rel key -> (checkpoint key, index) of layer l's arrays, routed experts excluded."""
        prefix, j = self.layer_location(spec, layout, l)
        index = () if j is None else (slice(None),) * layout.scan_axis + _stack_index(j)
        moe = self.moe_arrays(spec, l)
        return {rel: (f"{prefix}/{rel}", index) for rel in self.keys_of_layer(spec, l) if rel not in moe}

    def expert_reads(self, spec: ModelSpec, layout: Layout, l: int, e: int) -> dict[str, tuple[str, tuple]]:
        """rel key -> (checkpoint key, index) of expert e's slice of each routed-expert array of layer l."""
        prefix, j = self.layer_location(spec, layout, l)
        index = (e,) if j is None else (e,) + (slice(None),) * (layout.scan_axis - 1) + _stack_index(j)
        return {rel: (f"{prefix}/{rel}", index) for rel in self.moe_arrays(spec, l)}

    def embed(self, spec: ModelSpec, rows, token_ids):
        """`Embed.__call__`: table cast to the compute dtype, rows gathered (`rows`: the table's rows the prompt
        uses, `token_ids` indices into them)."""
        return rows.astype(spec.jdtype)[token_ids]

    def row_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        """Tables among `global_keys` read by rows like the embedding: `prompt_extra` gets the rows of the prompt's
        ids only. Default: none."""
        return ()

    def prompt_extra(self, spec: ModelSpec, g: dict, index: np.ndarray, x) -> dict:
        """Per-prompt inputs every `block` receives as keyword arguments (`PromptState.extra`), from the global arrays
        as stored (`g`; of `row_keys` only the rows of the prompt's sorted unique ids, `index` into them per
        position, as the embedding's) and the embedding output x (Gemma 4 small's per-layer inputs). A `block` may
        also return (x, dict) to add to them for later layers. Default: none."""
        return {}

    def final_norm(self, spec: ModelSpec, g: dict, y):
        """`apply_output_head` up to the logits: the final RMSNorm."""
        return rms_norm(y, g["decoder/decoder_norm/scale"], spec.norm_eps, spec.jdtype)

    def logits_block(self, spec: ModelSpec, y, w):
        """float32 logits of one vocabulary block: `w` is the tied embedding's rows `[Vb, E]` or the logits
        kernel's columns `[E, Vb]` (the same vocabulary columns of the whole matmul, bit for bit)."""
        if spec.tie_word_embeddings:
            # `attend_on_embedding` casts the table to bfloat16 (even in float32 runs) and accumulates in the compute
            # dtype (`logits_dot_in_fp32: false`). In bfloat16 runs that cast is a no-op. In float32 runs it would add
            # ~1e-5 of KL on a tied model that has nothing to do with the conversion, so it is only applied when
            # `bf16_tied_logits` is requested.
            w = w.astype(jnp.bfloat16 if spec.option("bf16_tied_logits", False) else spec.jdtype)
            logits = jnp.dot(y, w.T, preferred_element_type=spec.jdtype)
        else:
            logits = dense(y, w, spec.jdtype)
        return logits.astype(jnp.float32)

    # ---- mixture of experts (families whose layers route) -------------------------------------------
    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        """Everything of the layer before its routed experts: (x after attention, the experts' input h), or (x, h, the
        router's input) when the router sees something else than the experts (Gemma 4: another norm of x)."""
        raise NotImplementedError

    def route(self, spec: ModelSpec, p: dict, h):
        """`[T, E]` routing weights (zero for experts a token does not use)."""
        raise NotImplementedError

    def expert(self, spec: ModelSpec, w: dict, h):
        """One expert on its tokens `h` `[n, emb]`; `w` holds that expert's slice of each `moe_arrays` entry under the
        last component of its name (`wi_0`, `wi_1`, `wo`, biases). SiLU-gated by default."""
        return gated_mlp(h, w["wi_0"], w["wi_1"], w["wo"], spec.jdtype)

    def post_moe(self, spec: ModelSpec, p: dict, x, h, routed):
        """The layer's output from x, the experts' input h and the weighted sum of the experts `routed` (compute
        dtype)."""
        return x + routed


SLIDING_MARKER = "__sliding_window_layer__"  # present (empty) in the params of sliding-window layers


class PatternStacked(Forward):
    """Layers of a repeating attention pattern, scanned one stack per position in it (`decoder/layers/layers_<p>`,
    entry j = layer len(pattern) * j + p; MaxText's `scan_decoder_layers` over the pattern's block, as for GPT-OSS
    and OLMo 3), unscanned `decoder/layers_<l>`. `layer_markers` gives sliding-window layers `SLIDING_MARKER`."""

    pattern: tuple[str, ...] = ()
    label: str = ""  # the family's name in messages

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | None]:
        if not layout.scanned:
            return f"decoder/layers_{l}", None
        return f"decoder/layers/layers_{l % len(self.pattern)}", l // len(self.pattern)

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        layout = super().detect_layout(spec, keys)
        if layout.scanned and spec.num_layers % len(self.pattern):
            raise CkptflowError(
                f"a scanned {self.label} checkpoint needs a multiple of {len(self.pattern)} layers, "
                f"config has {spec.num_layers}"
            )
        return layout

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        sliding = self.pattern[l % len(self.pattern)] == "sliding_attention"
        return {SLIDING_MARKER: np.zeros((0,), np.float32)} if sliding else {}
