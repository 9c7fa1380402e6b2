"""Llama 3.x dense (HF `model_type: llama`) — MaxText decoder block `llama2`.

What MaxText computes (src/maxtext/models/llama2.py, layers/attentions.py, layers/embeddings.py):
  * pre-attention RMSNorm → q/k/v DenseGeneral (no bias) → interleaved ("pairwise") RoPE on q and k
    (`LLaMARotaryEmbedding`: dims (2i, 2i+1) rotate together, which is why the converter permutes
    HF's half-split q/k rows) → causal GQA attention with **no runtime 1/sqrt(D)**: the factor is baked
    into `query/kernel` by the converter → out projection → residual;
  * post-attention RMSNorm → SiLU-gated MLP → residual;
  * llama3.1 RoPE frequency scaling with MaxText's hard-coded constants (factor 8, low/high-freq
    factors 1/4, original context 8192), selected for llama3.1 models.

The interleaved RoPE is used for every `llama` checkpoint, because that is the layout the converter
writes (RoPE permutation on q/k); frequency scaling is applied when config.json says
`rope_type: llama3` (a config with other constants gets a warning: MaxText ignores them).
"""

from __future__ import annotations

import jax.numpy as jnp

from converters.verify.reference.common import (
    ATTENTION_KEYS,
    GATED_MLP_KEYS,
    Forward,
    ModelSpec,
    base_spec,
    causal_attention,
    dense,
    gated_mlp,
    require,
    rms_norm,
    rope_parameters,
)

# MaxText LLaMARotaryEmbedding._apply_scaling_factor constants (not read from any config there).
MAXTEXT_LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_scaled_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_context):
    """Llama 3.1 frequency scaling: keep high frequencies, divide low ones by `factor`, blend between."""
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return jnp.where(
        wavelen < high_freq_wavelen, inv_freq, jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, blended)
    )


def rope_interleaved(x, positions, theta: float, scaling: tuple | None, dtype):
    """MaxText `LLaMARotaryEmbedding`: pairs (2i, 2i+1) share frequency theta^(-2i/D).

    sin/cos stay float32 (the product is computed in float32, then cast to `dtype`).
    x: [T, H, D]; positions: [T].
    """
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (2 * jnp.arange(d // 2, dtype=jnp.float32) / d)
    if scaling is not None:
        s = dict(scaling)
        inv_freq = llama3_scaled_inv_freq(
            inv_freq, s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        )
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    pairs = x.reshape(*x.shape[:-1], d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.reshape(x.shape).astype(dtype)


class Llama31Forward(Forward):
    def make_spec(self, cfg) -> ModelSpec:
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r} (MaxText llama: silu)")
        require(not getattr(cfg, "attention_bias", False), "attention_bias=true (MaxText llama2 block has no biases)")
        require(not getattr(cfg, "mlp_bias", False), "mlp_bias=true")
        rp = rope_parameters(cfg)
        rope_type = rp.get("rope_type", "default")
        require(rope_type in ("default", "llama3"), f"rope_type={rope_type!r}")
        scaling = None
        if rope_type == "llama3":
            # MaxText ignores the config's numbers and uses its own constants; follow MaxText and
            # let the caller warn when the config disagrees (e.g. Llama 3.2 uses factor 32).
            scaling = tuple(sorted(MAXTEXT_LLAMA3_SCALING.items()))
        fields = base_spec(cfg)
        return ModelSpec(**fields, options=(("rope_scaling", scaling),))

    def config_warnings(self, cfg) -> list[str]:
        rp = rope_parameters(cfg)
        if rp.get("rope_type") != "llama3":
            return []
        diffs = [
            f"{k}={rp.get(k)!r}" for k, v in MAXTEXT_LLAMA3_SCALING.items() if k in rp and float(rp[k]) != float(v)
        ]
        if not diffs:
            return []
        return [
            "config.json llama3 rope scaling differs from the constants MaxText hard-codes "
            f"({', '.join(diffs)} vs {MAXTEXT_LLAMA3_SCALING}); the reference follows MaxText, "
            "so HF and MaxText logits will diverge on long prompts"
        ]

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return ATTENTION_KEYS + GATED_MLP_KEYS

    def block(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm(x, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt)  # [T, N, D]; 1/sqrt(D) already in the kernel
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = dense(h, p["self_attention/value/kernel"], dt)
        scaling = spec.option("rope_scaling")
        q = rope_interleaved(q, positions, spec.rope_theta, scaling, dt)
        k = rope_interleaved(k, positions, spec.rope_theta, scaling, dt)
        attn = causal_attention(q, k, v, dt)
        x = x + dense(attn, p["self_attention/out/kernel"], dt, contract=2)
        h = rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        return x + gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt)
