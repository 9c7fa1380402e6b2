"""GPT-OSS (HF `gpt_oss`) — MaxText decoder block `gpt_oss`.

What MaxText computes (src/maxtext/models/gpt_oss.py, layers/attentions.py, attention_op.py, moe.py,
embeddings.py `YarnRotaryEmbedding`):
  * layers alternate sliding-window attention (even layers, `sliding_window_size`) and full attention (odd
    layers); scanned, the two kinds are two interleaved stacks `decoder/layers/layers_0` (HF layers 0, 2, ...)
    and `layers_1` (1, 3, ...); unscanned, `decoder/layers_<i>`;
  * pre-attention RMSNorm → q/k/v with biases → half-split YaRN RoPE (frequencies blended between
    theta^(-2i/D) and theta^(-2i/D)/factor over the beta_fast..beta_slow correction range, output times
    0.1 ln(factor) + 1) → query times head_dim**-0.5 → attention whose softmax has one extra learned logit
    per head (`sinks`) → out projection with bias → residual;
  * post-attention RMSNorm → `GptOssMlp` (RoutedMoE with router bias and expert biases): softmax over the
    top-k biased router logits; per expert gate = x wi_0 + b0 clipped above at the limit, up = x wi_1 + b1
    clipped to +-limit, gate * sigmoid(1.702 gate) * (up + 1), then wo + bo → residual.
"""

from __future__ import annotations

import math

from converters.verify.reference.common import (
    SLIDING_MARKER,
    ModelSpec,
    PatternStacked,
    base_spec,
    dense,
    require,
    rms_norm,
    rope_parameters,
)
from converters.verify.reference.moe import (
    GPT_OSS_ALPHA,
    attention,
    clipped_swiglu,
    router_weights,
    yarn_inv_freq,
    yarn_rope,
)

ATT, MLP = "GptOssAttention", "GptOssMlp"
PATTERN = ("sliding_attention", "full_attention")  # MaxText GPT_OSS_ATTENTION_PATTERN
# MaxText's configs/models/gpt-oss-*.yml rope settings
MAXTEXT_YARN = {
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}


class GptOssForward(PatternStacked):
    pattern = PATTERN
    label = "GPT-OSS"

    def make_spec(self, cfg) -> ModelSpec:
        n = int(cfg.num_hidden_layers)
        types = list(getattr(cfg, "layer_types", None) or [])
        require(
            not types or types == [PATTERN[i % 2] for i in range(n)], "layer_types other than sliding/full alternating"
        )
        require(
            float(getattr(cfg, "swiglu_alpha", GPT_OSS_ALPHA)) == GPT_OSS_ALPHA,
            "swiglu_alpha != 1.702 (hard-coded in MaxText)",
        )
        rp = rope_parameters(cfg)
        require(rp.get("rope_type") == "yarn", f"rope_type={rp.get('rope_type')!r} (MaxText gpt-oss uses yarn)")
        require(
            rp.get("attention_factor") is None and not rp.get("mscale") and not rp.get("mscale_all_dim"),
            "yarn attention_factor/mscale (MaxText scales by 0.1 ln(factor) + 1)",
        )
        yarn = (
            float(rp["rope_theta"]),
            float(rp["factor"]),
            float(rp.get("beta_fast") or 32.0),
            float(rp.get("beta_slow") or 1.0),
            int(rp.get("original_max_position_embeddings") or 4096),
            bool(rp.get("truncate", True)),
        )
        return ModelSpec(
            **base_spec(cfg),
            options=(
                ("limit", float(cfg.swiglu_limit)),
                ("sliding_window", int(cfg.sliding_window)),
                ("top_k", int(cfg.num_experts_per_tok)),
                ("yarn", yarn),
            ),
        )

    def config_warnings(self, cfg) -> list[str]:
        rp = rope_parameters(cfg)
        diffs = [f"{k}={rp.get(k)!r}" for k, v in MAXTEXT_YARN.items() if rp.get(k) is not None and rp.get(k) != v]
        if not diffs:
            return []
        return [
            f"rope parameters differ from MaxText's gpt-oss configs ({', '.join(diffs)}); MaxText must be run with "
            f"matching rope_* settings"
        ]

    # ---- layout ---------------------------------------------------------------------------------
    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        att = [
            f"{ATT}/{k}"
            for k in (
                "query/kernel",
                "query/bias",
                "key/kernel",
                "key/bias",
                "value/kernel",
                "value/bias",
                "out/kernel",
                "out/bias",
                "sinks",
            )
        ]
        mlp = [
            f"{MLP}/{k}"
            for k in ("gate/kernel", "gate/bias", "wi_0", "wi_1", "wo", "wi_0_bias", "wi_1_bias", "wo_bias")
        ]
        return ("pre_self_attention_layer_norm/scale", *att, "post_self_attention_layer_norm/scale", *mlp)

    # ---- compute --------------------------------------------------------------------------------
    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return tuple(f"{MLP}/{k}" for k in ("wi_0", "wi_1", "wo", "wi_0_bias", "wi_1_bias", "wo_bias"))

    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm(x, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        q = dense(h, p[f"{ATT}/query/kernel"], dt, bias=p[f"{ATT}/query/bias"])
        k = dense(h, p[f"{ATT}/key/kernel"], dt, bias=p[f"{ATT}/key/bias"])
        v = dense(h, p[f"{ATT}/value/kernel"], dt, bias=p[f"{ATT}/value/bias"])
        theta, factor, beta_fast, beta_slow, original, truncate = spec.option("yarn")
        inv_freq = yarn_inv_freq(spec.head_dim, theta, factor, beta_fast, beta_slow, original, truncate)
        scaling = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
        q = yarn_rope(q, positions, inv_freq, scaling, dt)
        k = yarn_rope(k, positions, inv_freq, scaling, dt)
        q = q * (spec.head_dim**-0.5)  # query_pre_attn_scalar, at run time
        window = spec.option("sliding_window") if SLIDING_MARKER in p else None
        a = attention(q, k, v, dt, window=window, sinks=p[f"{ATT}/sinks"])
        x = x + dense(a, p[f"{ATT}/out/kernel"], dt, contract=2, bias=p[f"{ATT}/out/bias"])
        return x, rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)

    def route(self, spec: ModelSpec, p: dict, h):
        return router_weights(
            h, p[f"{MLP}/gate/kernel"], spec.jdtype, top_k=spec.option("top_k"), bias=p[f"{MLP}/gate/bias"]
        )

    def expert(self, spec: ModelSpec, w: dict, h):
        dt = spec.jdtype
        gate = dense(h, w["wi_0"], dt, bias=w["wi_0_bias"])
        up = dense(h, w["wi_1"], dt, bias=w["wi_1_bias"])
        return dense(clipped_swiglu(spec.option("limit"))(gate, up).astype(dt), w["wo"], dt, bias=w["wo_bias"])
