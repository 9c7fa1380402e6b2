"""OLMo 3 (HF `olmo3`) — MaxText decoder block `olmo3`.

What MaxText computes (src/maxtext/models/olmo3.py, layers/attentions.py, layers/normalizations.py
`GlobalRMSNorm`, layers/embeddings.py `RotaryEmbedding` / `YarnRotaryEmbedding`, layers/attention_op.py):
  * no pre-norm: q/k/v DenseGeneral on the layer input (no biases) → RMSNorm of q over all heads at once
    (`GlobalRMSNorm`: the `[heads, head_dim]` projection flattened, statistics over heads * head_dim; k likewise
    over kv_heads * head_dim) → half-split RoPE → q times `query_pre_attn_scalar` = head_dim**-0.5 at run time →
    causal GQA attention, cut to `sliding_window_size` unless the layer is a full-attention one (l % 4 == 3) →
    out projection → `post_self_attention_layer_norm` → residual;
  * SiLU-gated MLP on that → `post_mlp_layer_norm` → residual.

Layers are scanned as `decoder/layers/layers_<l % 4>` (entry l // 4) or unscanned `decoder/layers_<l>`.

RoPE per layer type. transformers (>= 5) keeps rope parameters per layer type: a published config's
`rope_scaling` (YaRN, olmo3-7b / olmo3-32b) goes to the full-attention layers only, and the sliding-window layers use
plain RoPE with the same theta -- what the OLMo 3 models were trained with. MaxText's olmo3 block passes the one
`config.rope_type` to every layer, so with YaRN it also rotates the sliding-window layers by YaRN's frequencies
and multiplies their q and k by YaRN's 0.1 ln(factor) + 1. The reference applies, for each layer type, the rope
parameters the HF config gives it (plain RoPE as `RotaryEmbedding`, YaRN as `YarnRotaryEmbedding` with
`rope_interleave: false`, `rope_truncate: true`, `rope_attention_scaling: true`), and warns when they differ
between the two types. Why HF's: verification asks whether the checkpoint holds the HF model's values in MaxText's
layout (its layout check runs the HF model on the checkpoint's values against this reference); the RoPE of the
sliding layers is not something a conversion can change. Where the two types agree (olmo3-7b-pt, or a config
whose `rope_parameters` give both the YaRN) this is exactly what MaxText computes.
"""

from __future__ import annotations

import math

from converters.errors import CkptflowError
from converters.verify.reference.common import (
    GATED_MLP_KEYS,
    SLIDING_MARKER,
    ModelSpec,
    PatternStacked,
    dense,
    gated_mlp,
    require,
    rms_norm,
    rope_halves,
)
from converters.verify.reference.moe import attention, yarn_inv_freq, yarn_rope

PATTERN = ("sliding_attention", "sliding_attention", "sliding_attention", "full_attention")  # OLMO3_ATTENTION_PATTERN
A = "attention"
LAYER_KEYS = (
    f"{A}/query/kernel",
    f"{A}/key/kernel",
    f"{A}/value/kernel",
    f"{A}/out/kernel",
    f"{A}/query_norm/scale",
    f"{A}/key_norm/scale",
    "post_self_attention_layer_norm/scale",
    *GATED_MLP_KEYS,
    "post_mlp_layer_norm/scale",
)


def _rope_spec(rp: dict | None, default_theta: float) -> tuple:
    """One layer type's rope parameters as a hashable spec: ("default", theta) or
    ("yarn", theta, factor, beta_fast, beta_slow, original_max, attention_scale)."""
    rp = dict(rp or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", default_theta))
    if kind == "default":
        return ("default", theta)
    require(kind == "yarn", f"rope_type={kind!r} (MaxText's olmo3 configs use default or yarn)")
    factor = float(rp["factor"])
    maxtext_scale = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0  # YarnRotaryEmbedding, rope_attention_scaling
    given = rp.get("attention_factor")
    require(
        given is None or math.isclose(float(given), maxtext_scale, rel_tol=1e-12),
        f"yarn attention_factor={given} (MaxText multiplies by 0.1 ln(factor) + 1 = {maxtext_scale})",
    )
    require(
        not rp.get("mscale") and not rp.get("mscale_all_dim"),
        "yarn mscale / mscale_all_dim (MaxText's olmo3 has neither)",
    )
    # transformers reads `truncate` from the top level of an olmo3 config's per-layer-type rope_parameters, where it
    # never is: it always truncates the correction range, as MaxText's olmo3 ymls do (rope_truncate: true)
    require(
        rp.get("truncate", True) is not False, "yarn truncate=false (transformers ignores it for olmo3 and truncates)"
    )
    return (
        "yarn",
        theta,
        factor,
        float(rp.get("beta_fast") or 32.0),
        float(rp.get("beta_slow") or 1.0),
        int(rp["original_max_position_embeddings"]),
        maxtext_scale,
    )


def _describe(rope: tuple) -> str:
    return (
        f"{rope[0]} RoPE (theta {rope[1]:g})"
        if rope[0] == "default"
        else f"YaRN (theta {rope[1]:g}, factor {rope[2]:g})"
    )


def _apply_rope(x, positions, rope: tuple, dtype):
    if rope[0] == "default":
        return rope_halves(x, positions, rope[1], dtype)
    _, theta, factor, beta_fast, beta_slow, original, scale = rope
    inv_freq = yarn_inv_freq(x.shape[-1], theta, factor, beta_fast, beta_slow, original, True)
    return yarn_rope(x, positions, inv_freq, scale, dtype)


def global_rms_norm(x, scale, eps: float, dtype):
    """`GlobalRMSNorm`: [T, H, D] normalized over H * D together (MaxText's RMSNorm numerics), shape kept."""
    t, h, d = x.shape
    return rms_norm(x.reshape(t, h * d), scale, eps, dtype).reshape(t, h, d)


class Olmo3Forward(PatternStacked):
    pattern = PATTERN
    label = "OLMo 3"

    def make_spec(self, cfg) -> ModelSpec:
        n = int(cfg.num_hidden_layers)
        want = [PATTERN[i % len(PATTERN)] for i in range(n)]
        require(
            list(getattr(cfg, "layer_types", None) or want) == want,
            "layer_types other than MaxText's 3 sliding + 1 full pattern",
        )
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r} (MaxText's olmo3: silu)")
        require(not getattr(cfg, "attention_bias", False), "attention_bias=true")
        rp = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = float(getattr(cfg, "default_theta", 500000.0))
        full = _rope_spec(rp.get("full_attention"), theta)
        sliding = _rope_spec(rp.get("sliding_attention"), theta)
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
        window = int(cfg.sliding_window or 0) if "sliding_attention" in want else 0
        require(window > 0 or "sliding_attention" not in want, "sliding_window=null with sliding-window layers")
        return ModelSpec(
            model_type=cfg.model_type,
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            num_layers=n,
            num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            intermediate_size=int(cfg.intermediate_size),
            norm_eps=float(cfg.rms_norm_eps),
            rope_theta=full[1],
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            options=(("rope_full", full), ("rope_sliding", sliding), ("sliding_window", window)),
        )

    def config_warnings(self, cfg) -> list[str]:
        rp = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = float(getattr(cfg, "default_theta", 500000.0))
        try:
            full, sliding = _rope_spec(rp.get("full_attention"), theta), _rope_spec(rp.get("sliding_attention"), theta)
        except CkptflowError:
            return []  # make_spec refuses it with the reason
        if full == sliding:
            return []
        return [
            f"the full-attention layers use {_describe(full)} and the sliding-window layers {_describe(sliding)}; "
            "the reference follows that, as transformers does, but MaxText's olmo3 block gives every layer the one "
            f"config.rope_type ({_describe(full)} with olmo3-7b / olmo3-32b), so MaxText itself computes different "
            "logits from HF's at every position"
        ]

    # ---- layout: 4-layer scanned blocks, or layers_<l> --------------------------------------------
    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return LAYER_KEYS

    # ---- compute --------------------------------------------------------------------------------
    def block(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        sliding = SLIDING_MARKER in p
        q = dense(x, p[f"{A}/query/kernel"], dt)  # [T, N, D]
        k = dense(x, p[f"{A}/key/kernel"], dt)
        v = dense(x, p[f"{A}/value/kernel"], dt)
        q = global_rms_norm(q, p[f"{A}/query_norm/scale"], spec.norm_eps, dt)
        k = global_rms_norm(k, p[f"{A}/key_norm/scale"], spec.norm_eps, dt)
        rope = spec.option("rope_sliding" if sliding else "rope_full")
        q = _apply_rope(q, positions, rope, dt)
        k = _apply_rope(k, positions, rope, dt)
        q = q * (spec.head_dim**-0.5)  # query_pre_attn_scalar, at run time (weak-typed: stays in dt)
        a = attention(q, k, v, dt, window=spec.option("sliding_window") if sliding else None)
        h = rms_norm(
            dense(a, p[f"{A}/out/kernel"], dt, contract=2), p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt
        )
        x = x + h
        m = gated_mlp(x, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt)
        return x + rms_norm(m, p["post_mlp_layer_norm/scale"], spec.norm_eps, dt)
