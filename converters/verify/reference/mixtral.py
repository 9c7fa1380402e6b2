"""Mixtral (HF `mixtral`) — MaxText decoder block `mixtral`.

What MaxText computes (src/maxtext/models/mixtral.py, layers/attentions.py, layers/moe.py):
  * pre-attention RMSNorm → q/k/v (no bias) → half-split RoPE (`RotaryEmbedding`) → causal GQA attention
    with **no runtime 1/sqrt(head_dim)**: the converter bakes it into `query/kernel` → out projection
    (`[heads, head_dim, emb]`, sized from heads x head_dim) → residual;
  * post-attention RMSNorm → `MoeBlock_0` (RoutedMoE): softmax over the top-2 router logits (HF's softmax →
    top-k → renormalise is the same), SiLU-gated experts, no biases → residual.

Sliding window: the published Mixtral configs have none. When a config sets `sliding_window`, the reference
applies it as HF does (key j visible from query i iff i - window < j <= i). MaxText's mixtral block itself
always attends globally (its Attention is built without a window), so that case also carries a warning:
MaxText and HF disagree beyond the window however the checkpoint was converted.
"""

from __future__ import annotations

from converters.verify.reference.common import (
    ATTENTION_KEYS,
    Forward,
    ModelSpec,
    base_spec,
    dense,
    require,
    rms_norm,
    rope_halves,
    rope_parameters,
)
from converters.verify.reference.moe import attention, router_weights

MOE = "MoeBlock_0"


class MixtralForward(Forward):
    def make_spec(self, cfg) -> ModelSpec:
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
        require(rope_parameters(cfg).get("rope_type", "default") == "default", "rope scaling")
        return ModelSpec(
            **base_spec(cfg),
            options=(
                ("num_experts", int(cfg.num_local_experts)),
                ("sliding_window", int(getattr(cfg, "sliding_window", None) or 0)),
                ("top_k", int(cfg.num_experts_per_tok)),
            ),
        )

    def config_warnings(self, cfg) -> list[str]:
        window = getattr(cfg, "sliding_window", None)
        if not window:
            return []
        return [
            f"sliding_window={window}: the reference applies it like HF, but MaxText's mixtral block attends "
            "globally, so MaxText itself diverges from HF on prompts longer than the window"
        ]

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return ATTENTION_KEYS + (
            f"{MOE}/gate/kernel",
            f"{MOE}/wi_0",
            f"{MOE}/wi_1",
            f"{MOE}/wo",
        )

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return (f"{MOE}/wi_0", f"{MOE}/wi_1", f"{MOE}/wo")

    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm(x, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt)  # 1/sqrt(head_dim) already in the kernel
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = dense(h, p["self_attention/value/kernel"], dt)
        q = rope_halves(q, positions, spec.rope_theta, dt)
        k = rope_halves(k, positions, spec.rope_theta, dt)
        a = attention(q, k, v, dt, window=spec.option("sliding_window") or None)
        x = x + dense(a, p["self_attention/out/kernel"], dt, contract=2)
        return x, rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)

    def route(self, spec: ModelSpec, p: dict, h):
        return router_weights(h, p[f"{MOE}/gate/kernel"], spec.jdtype, top_k=spec.option("top_k"))
