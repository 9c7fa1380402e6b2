"""Gemma 4 text model, dense and MoE (HF `gemma4_text`, MaxText block `gemma4`, models `gemma4-31b`, `gemma4-26b`).

What MaxText 0.2.5 computes (src/maxtext/models/gemma4.py `Gemma4DecoderLayer`, layers/attentions.py,
layers/embeddings.py `RotaryEmbedding` / `Gemma4PartialRotaryEmbedding`, layers/nnx_decoders.py), for a checkpoint
laid out by converters/families/gemma4.py:

  * embedding: the table already holds sqrt(hidden) (float32); the tied output divides the logits by the exact
    sqrt(hidden) again (`normalize_embedding_logits`), then `final_logits_soft_cap`: cap * tanh(logits / cap);
  * every RMSNorm multiplies by the stored scale (no `1 + w`); the value norm has no scale;
  * a layer: pre-norm -> attention -> post-attention norm -> residual; pre-ffw norm -> GELU(tanh)-gated MLP ->
    post-ffw norm -> residual; the sum times `layer_scalar`;
  * attention: q/k per-head RMSNorm, v scale-free RMSNorm (all before RoPE), no query scaling
    (`query_pre_attn_scalar=1.0`), no logit soft-cap. Layer l is global iff l % 6 == 5: global layers have their
    own head_dim and kv heads, keys as values with `share_kv_projections` (the value is the key projection before
    its norm), RoPE theta 1e6 on the first `partial_rotary_factor` of each half of the head (the rest passes
    through); local layers RoPE theta 1e4 over the whole head and a sliding window (key j visible from query i
    iff i - window < j <= i).
  * MoE layers (26b; models/gemma4.py `Gemma4MoE`, layers/moe.py `RoutedAndSharedMoE` / `RoutedMoE.get_topk`, with
    base.yml's `float32_gate_logits: false`, `float32_weight_sum: true`, dropless): after attention, x goes three
    ways. The shared expert: GELU(tanh)-gated MLP on pre_ffw_norm(x), then `post_feedforward_layernorm_1`. The
    router: logits = (scale-free RMSNorm(x) * emb**-0.5 * `pre_forward_scale_2`) @ gate kernel, all in the compute
    dtype; probabilities = float32 softmax over all experts; the top-k experts by logit keep their probabilities
    (cast to the compute dtype), renormalised to sum one (`norm_topk_prob`), times their `per_expert_scale`. The
    routed experts: GELU(tanh)-gated experts on `pre_feedforward_layernorm_2`(x), summed with those weights in
    float32 (streamed one expert at a time), then `post_feedforward_layernorm_2`. The two sums go through
    post_ffw_norm into the residual; the sum times `layer_scalar`. HF computes the same (softmax, top-k of the
    probabilities, renormalise, per-expert scale; its router multiplies by the scale before emb**-0.5, a float
    rounding apart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import CkptflowError
from converters.families.gemma4 import GLOBAL, LOCAL, MLP, MOE, PATTERN, is_global, layer_types
from converters.verify.reference.common import Layout, ModelSpec, dense, gated_mlp, require, rms_norm
from converters.verify.reference.gemma import _GemmaBase, _mlp_keys, _norm_keys, gelu_tanh, gemma_attention

GLOBAL_MARKER = "global_attention"
MOE_NORMS = ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")


def rope_partial(x, positions, theta: float, fraction: float, dtype):
    """Half-split RoPE over pairs (i, i + D/2) whose first `fraction` of the D/2 angles rotate, with timescale
    theta^(2i/D) (the full head_dim as denominator); the other angles are 0 (MaxText `Gemma4PartialRotaryEmbedding`,
    HF's `proportional` RoPE). fraction 1: plain `RotaryEmbedding`. sin/cos float32, cast to x's dtype. x: [T, H, D]."""
    d = x.shape[-1]
    rotated = int(d * fraction) // 2
    timescale = theta ** (2 * jnp.arange(rotated, dtype=jnp.float32) / d)
    inv = jnp.concatenate([1.0 / timescale, jnp.zeros((d // 2 - rotated,), jnp.float32)])
    angle = positions.astype(jnp.float32)[:, None, None] * inv
    sin = jnp.sin(angle).astype(x.dtype)
    cos = jnp.cos(angle).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)


def _rope_entry(params: dict | None, kinds: tuple[str, ...], default_theta: float) -> tuple[float, float]:
    """(theta, rotated fraction) of one transformers rope-parameters entry."""
    params = dict(params or {})
    kind = params.get("rope_type", "default")
    require(kind in kinds, f"rope_type={kind!r} (MaxText's gemma4 block: {' / '.join(kinds)})")
    require(float(params.get("factor", 1.0)) == 1.0, "rope scaling factor != 1")
    fraction = float(params.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
    return float(params.get("rope_theta", default_theta)), fraction


def text_spec(cfg, period: int, options: list) -> ModelSpec:
    """The ModelSpec of a Gemma 4 text model whose global layers are every `period`-th (gemma4 / gemma4_small):
    tied output, no biases, causal; the attention shapes, window, RoPE and soft-cap as options, with `options` of the
    block's own."""
    require(bool(getattr(cfg, "tie_word_embeddings", True)), "tie_word_embeddings=false")
    require(not getattr(cfg, "attention_bias", False), "attention_bias=true")
    require(getattr(cfg, "use_bidirectional_attention", None) != "all", "bidirectional attention")
    rp = dict(cfg.rope_parameters or {})
    local_theta, local_fraction = _rope_entry(rp.get("sliding_attention"), ("default",), 10000.0)
    global_theta, global_fraction = _rope_entry(rp.get("full_attention"), ("default", "proportional"), 1e6)
    local, g = cfg.per_layer_config[0], cfg.per_layer_config[period - 1]  # the per-layer attributes
    options = [
        ("sliding_window", int(cfg.sliding_window)),
        ("local_rope", (local_theta, local_fraction)),
        ("global_rope", (global_theta, global_fraction)),
        ("global_attention", (int(g.num_key_value_heads), int(g.head_dim))),
        ("final_softcap", float(cfg.final_logit_softcapping or 0.0) or None),
        *options,
    ]
    heads = int(cfg.num_attention_heads)
    return ModelSpec(
        model_type=cfg.model_type,
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(local.num_key_value_heads or heads),
        head_dim=int(local.head_dim),
        intermediate_size=int(cfg.intermediate_size),
        norm_eps=float(cfg.rms_norm_eps),
        rope_theta=local_theta,
        tie_word_embeddings=True,
        options=tuple(sorted(options)),
    )


class Gemma4Forward(_GemmaBase):
    """Text decoder; scanned `decoder/scanned_blocks/{local_layers,global_layer}` or unscanned `decoder/layers_<l>`."""

    def make_spec(self, cfg) -> ModelSpec:
        require(cfg.model_type == "gemma4_text", f"model_type {cfg.model_type!r} (only the text model gemma4_text)")
        require(not getattr(cfg, "hidden_size_per_layer_input", 0), "per-layer embeddings (e2b/e4b)")
        require(not getattr(cfg, "num_kv_shared_layers", 0), "shared KV layers")
        n = int(cfg.num_hidden_layers)
        require(
            n % PATTERN == 0 and list(cfg.layer_types) == layer_types(n),
            "a layer pattern other than MaxText's 5 local + 1 global",
        )
        options = [("k_eq_v", bool(cfg.attention_k_eq_v))]
        if getattr(cfg, "enable_moe_block", False):
            experts, top_k = int(cfg.num_experts or 0), int(cfg.top_k_experts or 0)
            require(experts >= 2 and 0 < top_k <= experts, f"num_experts={experts}, top_k_experts={top_k}")
            options += [("experts", experts), ("top_k", top_k)]
        return text_spec(cfg, PATTERN, options)

    # ---- layout -----------------------------------------------------------------------------------
    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        attn = tuple(f"self_attention/{m}/kernel" for m in ("query", "key", "value", "out"))
        norms = ("self_attention/query_norm/scale", "self_attention/key_norm/scale")
        if not spec.option("experts"):
            return (*_norm_keys(), *norms, *attn, *_mlp_keys(), "layer_scalar")
        moe = (
            *_mlp_keys(f"{MLP}/moe_block/shared_experts"),
            *(f"{MLP}/{n}/scale" for n in MOE_NORMS),
            f"{MLP}/pre_forward_scale_2",
            f"{MOE}/gate/kernel",
            f"{MOE}/per_expert_scale",
            *self.moe_arrays(spec, 0),
        )
        return (*_norm_keys(), *norms, *attn, *moe, "layer_scalar")

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return (f"{MOE}/wi_0", f"{MOE}/wi_1", f"{MOE}/wo") if spec.option("experts") else ()

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        keys = self.layer_keys(spec)
        if is_global(l) and spec.option("k_eq_v"):
            keys = tuple(k for k in keys if k != "self_attention/value/kernel")
        return keys

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | tuple[int, int] | None]:
        if not layout.scanned:
            return f"decoder/layers_{l}", None
        b, p = divmod(l, PATTERN)
        return (GLOBAL, b) if p == PATTERN - 1 else (LOCAL, (b, p))

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        return {GLOBAL_MARKER: np.zeros((0,), np.float32)} if is_global(l) else {}

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        scanned = any(k.startswith("decoder/scanned_blocks/") for k in keys)
        unscanned = any(k.startswith("decoder/layers_") for k in keys)
        if scanned and unscanned:
            raise CkptflowError(
                "checkpoint has both scanned (decoder/scanned_blocks/) and unscanned (decoder/layers_<i>/) layers"
            )
        if not scanned and not unscanned:
            raise CkptflowError(
                "checkpoint has no decoder layers (neither decoder/scanned_blocks/ nor decoder/layers_0/)"
            )
        return Layout(scanned=scanned, num_layers=spec.num_layers)

    # ---- compute --------------------------------------------------------------------------------
    def attend(self, spec: ModelSpec, p: dict, x, positions, image_blocks=None):
        """The attention half of a layer: x plus the normed attention output. `image_blocks` (the image run of each
        position, 0 for text): local layers also attend within each image, as MaxText's gemma4 block."""
        dt, eps = spec.jdtype, spec.norm_eps
        glob = GLOBAL_MARKER in p
        h = rms_norm(x, p["pre_self_attention_norm/scale"], eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt)
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = k if "self_attention/value/kernel" not in p else dense(h, p["self_attention/value/kernel"], dt)
        q = rms_norm(q, p["self_attention/query_norm/scale"], eps, dt)
        k = rms_norm(k, p["self_attention/key_norm/scale"], eps, dt)
        v = rms_norm(v, jnp.ones((v.shape[-1],), dt), eps, dt)  # value_norm: with_scale=False
        theta, fraction = spec.option("global_rope" if glob else "local_rope")
        q = rope_partial(q, positions, theta, fraction, dt)
        k = rope_partial(k, positions, theta, fraction, dt)
        window, blocks = (None, None) if glob else (spec.option("sliding_window"), image_blocks)
        a = gemma_attention(q, k, v, dt, window=window, image_blocks=blocks)
        a = dense(a, p["self_attention/out/kernel"], dt, contract=2)
        return x + rms_norm(a, p["post_self_attention_norm/scale"], eps, dt)

    def block(self, spec: ModelSpec, p: dict, x, positions):
        dt, eps = spec.jdtype, spec.norm_eps
        x = self.attend(spec, p, x, positions)
        h = rms_norm(x, p["pre_ffw_norm/scale"], eps, dt)
        m = gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt, gelu_tanh)
        x = x + rms_norm(m, p["post_ffw_norm/scale"], eps, dt)
        return x * p["layer_scalar"].astype(dt)

    # ---- MoE layers (26b) -------------------------------------------------------------------------
    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        """(x after attention, the routed experts' input, the router's input)."""
        dt, eps = spec.jdtype, spec.norm_eps
        x = self.attend(spec, p, x, positions)
        h = rms_norm(x, p[f"{MLP}/pre_feedforward_layernorm_2/scale"], eps, dt)
        unscaled = rms_norm(x, jnp.ones((x.shape[-1],), dt), eps, dt)  # gate_norm: with_scale=False
        r = unscaled * spec.hidden_size**-0.5 * p[f"{MLP}/pre_forward_scale_2"].astype(dt)  # in Gemma4MoE's order
        return x, h, r

    def route(self, spec: ModelSpec, p: dict, r):
        dt = spec.jdtype
        logits = dense(r, p[f"{MOE}/gate/kernel"], dt)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, top = jax.lax.top_k(logits, spec.option("top_k"))  # by logit, as get_topk's gemma4 branch
        w = jnp.take_along_axis(probs, top, axis=-1).astype(dt)
        w = w / w.sum(axis=-1, keepdims=True)  # norm_topk_prob
        w = w * p[f"{MOE}/per_expert_scale"].astype(dt)[top]
        rows = jnp.arange(r.shape[0])[:, None]
        return jnp.zeros((r.shape[0], spec.option("experts")), dt).at[rows, top].set(w)

    def expert(self, spec: ModelSpec, w: dict, h):
        return gated_mlp(h, w["wi_0"], w["wi_1"], w["wo"], spec.jdtype, gelu_tanh)

    def post_moe(self, spec: ModelSpec, p: dict, x, h, routed):
        dt, eps = spec.jdtype, spec.norm_eps
        s = f"{MLP}/moe_block/shared_experts"
        shared = rms_norm(x, p["pre_ffw_norm/scale"], eps, dt)
        shared = gated_mlp(shared, p[f"{s}/wi_0/kernel"], p[f"{s}/wi_1/kernel"], p[f"{s}/wo/kernel"], dt, gelu_tanh)
        m = rms_norm(shared, p[f"{MLP}/post_feedforward_layernorm_1/scale"], eps, dt)
        m = m + rms_norm(routed, p[f"{MLP}/post_feedforward_layernorm_2/scale"], eps, dt)
        x = x + rms_norm(m, p["post_ffw_norm/scale"], eps, dt)
        return x * p["layer_scalar"].astype(dt)
