"""Gemma 4 small text models (HF `gemma4_text` with per-layer inputs / shared KV, MaxText block `gemma4_small`, models
`gemma4-e2b`, `gemma4-e4b`).

What MaxText 0.2.5 computes (src/maxtext/models/gemma4_small.py `Gemma4SmallPLE`, `Gemma4SmallDecoderLayer`,
layers/nnx_decoders.py `_apply_gemma4_small_layers`, layers/attentions.py), for a checkpoint laid out by
converters/families/gemma4_small.py (unscanned `decoder/layers_<l>` only):

  * embedding and output as the dense gemma4 block (converters/verify/reference/gemma4.py): the table holds
    sqrt(hidden); tied logits divided by sqrt(hidden), then the final soft-cap;
  * per-layer inputs, once per prompt from the token ids and the embedding output x0 (`Gemma4SmallPLE`):
    identity = table_ple[id] (cast to the compute dtype) * sqrt(P), context = RMSNorm((x0 @ proj) * E**-0.5) per
    layer slice of P, input = (identity + context) * 2**-0.5, `[T, L, P]`;
  * a layer: pre-norm -> attention -> post-attention norm -> residual; pre-ffw norm -> GELU(tanh)-gated MLP ->
    post-ffw norm -> residual; then, with per-layer inputs, x + RMSNorm(proj(gelu_tanh(float32 gate(x)) *
    input[l])); the sum times `layer_scalar`;
  * attention as the dense gemma4 block (q/k norms, scale-free value norm, no query scaling, window on local layers,
    partial RoPE on global layers of their own head_dim), with the attention pattern of the layer_types (period 5
    for e2b, 6 for e4b);
  * KV sharing: from layer L - num_kv_shared_layers on, a layer computes only its query and reuses the rotated, normed
    keys and normed values of the last earlier unshared layer of its kind (`kv_donor_layer_idx`).

The reference carries per-prompt state between stages in `PromptState.extra` (`prompt_extra` makes the per-layer
inputs, a donor layer's `block` hands its K/V on), which `block` receives as keyword arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import CkptflowError
from converters.families.gemma4_small import PERIODS, PLE, first_shared, kv_donor, layer_types
from converters.verify.reference.common import EMBEDDING, Layout, ModelSpec, dense, gated_mlp, require, rms_norm
from converters.verify.reference.gemma import _GemmaBase, _mlp_keys, _norm_keys, gelu_tanh, gemma_attention
from converters.verify.reference.gemma4 import GLOBAL_MARKER, rope_partial, text_spec

PLE_TABLE = f"{PLE}/embed_tokens_per_layer"
PLE_PROJ = f"{PLE}/per_layer_model_projection/kernel"
PLE_NORM = f"{PLE}/per_layer_projection_norm/scale"
STORE_MARKER = "kv_donor"  # present (empty) in the params of a layer whose K/V later layers reuse
LAYER_INDEX = "per_layer_index"  # int32 scalar: which slice of the per-layer inputs (traced, no recompile)
PER_LAYER_KEYS = ("per_layer_input_gate/kernel", "per_layer_projection/kernel", "post_per_layer_input_norm/scale")
KV_KEYS = ("self_attention/key/kernel", "self_attention/value/kernel", "self_attention/key_norm/scale")


def _kind(glob: bool) -> str:
    return "kv_full" if glob else "kv_sliding"


@functools.partial(jax.jit, static_argnums=0)
def _per_layer_inputs(spec: ModelSpec, rows, proj, norm, x0):
    """`Gemma4SmallPLE.__call__` on one prompt: rows `[T, L*P]` of the per-layer table (as stored), x0 `[T, E]`."""
    dt = spec.jdtype
    n, p = spec.num_layers, spec.option("ple")
    identity = (rows.astype(dt) * jnp.asarray(float(p) ** 0.5, dt)).reshape(-1, n, p)
    context = dense(x0, proj, dt) * jnp.asarray(float(spec.hidden_size) ** -0.5, dt)
    context = rms_norm(context.reshape(-1, n, p), norm, spec.norm_eps, dt)
    return ((identity + context) * jnp.asarray(2.0**-0.5, dt)).astype(dt)


class Gemma4SmallForward(_GemmaBase):
    """Text decoder with per-layer inputs and shared KV layers; unscanned `decoder/layers_<l>`."""

    def make_spec(self, cfg) -> ModelSpec:
        require(cfg.model_type == "gemma4_text", f"model_type {cfg.model_type!r} (only the text model gemma4_text)")
        require(not getattr(cfg, "enable_moe_block", False), "the MoE block")
        require(not getattr(cfg, "attention_k_eq_v", False), "attention_k_eq_v (gemma4_small has value projections)")
        n = int(cfg.num_hidden_layers)
        types = list(cfg.layer_types)
        period = next((p for p in PERIODS if types == layer_types(n, p)), None)
        require(period is not None, "a layer pattern other than MaxText's 4 + 1 (gemma4-e2b) or 5 + 1 local/global")
        shared = int(getattr(cfg, "num_kv_shared_layers", 0) or 0)
        require(shared < n, "every layer KV-shared")
        ple = int(getattr(cfg, "hidden_size_per_layer_input", 0) or 0)
        ple = ple if int(getattr(cfg, "vocab_size_per_layer_input", 0) or 0) else 0
        # read by the rows of the embedding's ids
        require(
            not ple or int(cfg.vocab_size_per_layer_input) == int(cfg.vocab_size),
            "vocab_size_per_layer_input != vocab_size",
        )
        options = [
            ("period", period),
            ("kv_shared", shared),
            ("ple", ple),
            ("ple_vocab", int(getattr(cfg, "vocab_size_per_layer_input", 0) or 0)),
        ]
        return text_spec(cfg, period, options)

    # ---- layout -----------------------------------------------------------------------------------
    def _types(self, spec: ModelSpec) -> list[str]:
        return layer_types(spec.num_layers, spec.option("period"))

    def _is_global(self, spec: ModelSpec, l: int) -> bool:
        return l % spec.option("period") == spec.option("period") - 1

    def _shared(self, spec: ModelSpec, l: int) -> bool:
        return l >= first_shared(spec.num_layers, spec.option("kv_shared"))

    def global_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        keys = (EMBEDDING, "decoder/decoder_norm/scale")
        return keys + ((PLE_TABLE, PLE_PROJ, PLE_NORM) if spec.option("ple") else ())

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        attn = tuple(f"self_attention/{m}/kernel" for m in ("query", "key", "value", "out"))
        norms = ("self_attention/query_norm/scale", "self_attention/key_norm/scale")
        ple = PER_LAYER_KEYS if spec.option("ple") else ()
        return (*_norm_keys(), *norms, *attn, *_mlp_keys(), "layer_scalar", *ple)

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        keys = self.layer_keys(spec)
        return tuple(k for k in keys if k not in KV_KEYS) if self._shared(spec, l) else keys

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        types, shared = self._types(spec), spec.option("kv_shared")
        out: dict = {LAYER_INDEX: np.asarray(l, np.int32)}
        if self._is_global(spec, l):
            out[GLOBAL_MARKER] = np.zeros((0,), np.float32)
        if any(kv_donor(j, types, shared) == l for j in range(spec.num_layers)):
            out[STORE_MARKER] = np.zeros((0,), np.float32)
        return out

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        if any(k.startswith(("decoder/layers/", "decoder/scanned_blocks/")) for k in keys):
            raise CkptflowError(
                "a scanned gemma4_small checkpoint: MaxText 0.2.5 has no scanned layout for this block "
                "(scan_layers=false only)"
            )
        if not any(k.startswith("decoder/layers_") for k in keys):
            raise CkptflowError("checkpoint has no decoder layers (no decoder/layers_0/)")
        return Layout(scanned=False, num_layers=spec.num_layers)

    # ---- compute --------------------------------------------------------------------------------
    def row_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return (PLE_TABLE,) if spec.option("ple") else ()

    def prompt_extra(self, spec: ModelSpec, g: dict, index: np.ndarray, x0) -> dict:
        """The per-layer inputs of one prompt (`[T, L, P]`, compute dtype), from the stored global arrays `g`, of the
        table only the rows of the prompt's ids (a gather commutes with MaxText's cast of the whole table)."""
        if not spec.option("ple"):
            return {}
        rows = np.asarray(g[PLE_TABLE])[np.asarray(index)]
        cast = {k: jnp.asarray(np.asarray(g[k])).astype(spec.jdtype) for k in (PLE_PROJ, PLE_NORM)}
        return {"ple": _per_layer_inputs(spec, jnp.asarray(rows), cast[PLE_PROJ], cast[PLE_NORM], x0)}

    def block(self, spec: ModelSpec, p: dict, x, positions, ple=None, kv_sliding=None, kv_full=None):
        dt, eps = spec.jdtype, spec.norm_eps
        glob = GLOBAL_MARKER in p
        h = rms_norm(x, p["pre_self_attention_norm/scale"], eps, dt)
        theta, fraction = spec.option("global_rope" if glob else "local_rope")
        q = dense(h, p["self_attention/query/kernel"], dt)
        q = rms_norm(q, p["self_attention/query_norm/scale"], eps, dt)
        q = rope_partial(q, positions, theta, fraction, dt)
        if "self_attention/key/kernel" in p:
            k = dense(h, p["self_attention/key/kernel"], dt)
            v = dense(h, p["self_attention/value/kernel"], dt)
            k = rms_norm(k, p["self_attention/key_norm/scale"], eps, dt)
            v = rms_norm(v, jnp.ones((v.shape[-1],), dt), eps, dt)  # value_norm: with_scale=False
            k = rope_partial(k, positions, theta, fraction, dt)
        else:  # a KV-shared layer: its donor's rotated, normed K/V
            k, v = kv_full if glob else kv_sliding
        a = gemma_attention(q, k, v, dt, window=None if glob else spec.option("sliding_window"))
        a = dense(a, p["self_attention/out/kernel"], dt, contract=2)
        x = x + rms_norm(a, p["post_self_attention_norm/scale"], eps, dt)
        h = rms_norm(x, p["pre_ffw_norm/scale"], eps, dt)
        m = gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt, gelu_tanh)
        x = x + rms_norm(m, p["post_ffw_norm/scale"], eps, dt)
        if ple is not None:
            gate = dense(x, p["per_layer_input_gate/kernel"], dt)
            gate = jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(dt)
            inp = jax.lax.dynamic_index_in_dim(ple, p[LAYER_INDEX], axis=1, keepdims=False)
            proj = dense(gate * inp.astype(dt), p["per_layer_projection/kernel"], dt)
            x = x + rms_norm(proj, p["post_per_layer_input_norm/scale"], eps, dt)
        x = x * p["layer_scalar"].astype(dt)
        if STORE_MARKER in p:
            return x, {_kind(glob): (k, v)}
        return x
