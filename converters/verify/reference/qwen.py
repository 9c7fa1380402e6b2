"""Qwen2.5 (HF `qwen2`) and Qwen3 dense (HF `qwen3`) — MaxText decoder blocks `qwen2` / `qwen3`.

What MaxText computes (src/maxtext/models/qwen2.py, qwen3.py, layers/attentions.py):
  * pre-attention RMSNorm → q/k/v DenseGeneral (Qwen2: with biases on q/k/v, none on out) →
    [Qwen3: per-head RMSNorm over D on q and k (`query_norm`/`key_norm`, plain scale)] →
    half-split RoPE (`RotaryEmbedding`, pairs (i, i+D/2)) → query multiplied at runtime by
    `query_pre_attn_scalar = head_dim**-0.5` (nothing is baked into the weights) → causal GQA
    attention → out projection → residual;
  * post-attention RMSNorm → SiLU-gated MLP → residual.
"""

from __future__ import annotations

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
    rope_halves,
    rope_parameters,
)

_COMMON_KEYS = ATTENTION_KEYS + GATED_MLP_KEYS
_BIAS_KEYS = ("self_attention/query/bias", "self_attention/key/bias", "self_attention/value/bias")
_QK_NORM_KEYS = ("self_attention/query_norm/scale", "self_attention/key_norm/scale")


def _check_common(cfg) -> None:
    require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
    rp = rope_parameters(cfg)
    require(rp.get("rope_type", "default") == "default", f"rope_type={rp.get('rope_type')!r}")
    require(
        not getattr(cfg, "use_sliding_window", False),
        "use_sliding_window=true (MaxText's qwen blocks use full causal attention)",
    )


class _QwenBase(Forward):
    qk_norm = False
    qkv_bias = False
    rope = staticmethod(rope_halves)  # Qwen3-VL: multimodal RoPE (reference/qwen3_vl.py)

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        keys = _COMMON_KEYS
        if self.qkv_bias:
            keys += _BIAS_KEYS
        if self.qk_norm:
            keys += _QK_NORM_KEYS
        return keys

    def block(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm(x, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt, bias=p.get("self_attention/query/bias"))
        k = dense(h, p["self_attention/key/kernel"], dt, bias=p.get("self_attention/key/bias"))
        v = dense(h, p["self_attention/value/kernel"], dt, bias=p.get("self_attention/value/bias"))
        if self.qk_norm:
            q = rms_norm(q, p["self_attention/query_norm/scale"], spec.norm_eps, dt)
            k = rms_norm(k, p["self_attention/key_norm/scale"], spec.norm_eps, dt)
        q = self.rope(q, positions, spec.rope_theta, dt)
        k = self.rope(k, positions, spec.rope_theta, dt)
        q = q * (spec.head_dim**-0.5)  # query_pre_attn_scalar, applied at runtime (weak-typed: stays in dt)
        attn = causal_attention(q, k, v, dt)
        x = x + dense(attn, p["self_attention/out/kernel"], dt, contract=2)
        h = rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        return x + gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt)


class Qwen25Forward(_QwenBase):
    """Qwen2 / Qwen2.5: q/k/v biases (HF always has them for qwen2), no qk-norm."""

    qkv_bias = True

    def make_spec(self, cfg) -> ModelSpec:
        _check_common(cfg)
        return ModelSpec(**base_spec(cfg))


class Qwen3Forward(_QwenBase):
    """Qwen3 dense: qk-norm, no biases (MaxText's qwen3 block cannot express attention_bias=true)."""

    qk_norm = True

    def make_spec(self, cfg) -> ModelSpec:
        _check_common(cfg)
        require(not getattr(cfg, "attention_bias", False), "attention_bias=true (MaxText qwen3 block has no biases)")
        return ModelSpec(**base_spec(cfg))
