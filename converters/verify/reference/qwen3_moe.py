"""Qwen3-MoE (HF `qwen3_moe`) — MaxText decoder block `qwen3_moe`.

What MaxText computes (src/maxtext/models/qwen3.py `Qwen3MoeDecoderLayer`, layers/moe.py):
  * the Qwen3 attention: pre-attention RMSNorm → q/k/v (no bias) → per-head q/k RMSNorm → half-split RoPE
    → query times head_dim**-0.5 at run time → causal GQA attention → out projection → residual;
  * post-attention RMSNorm → `moe_block` (RoutedMoE, no shared expert, no biases): softmax over the top-k
    router logits, renormalised (`norm_topk_prob`), SiLU-gated experts → residual.

HF (softmax over all experts → top-k → renormalise) gives the same weights when `norm_topk_prob` is set;
without it HF's weights do not sum to one and MaxText cannot express that, so such configs are refused.
"""

from __future__ import annotations

from converters.verify.reference.common import (
    Forward,
    ModelSpec,
    base_spec,
    causal_attention,
    dense,
    require,
    rms_norm,
    rope_halves,
    rope_parameters,
)
from converters.verify.reference.moe import router_weights

MOE = "moe_block"


class Qwen3MoeForward(Forward):
    rope = staticmethod(rope_halves)  # Qwen3-VL-MoE: multimodal RoPE (reference/qwen3_vl.py)

    def make_spec(self, cfg) -> ModelSpec:
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
        require(rope_parameters(cfg).get("rope_type", "default") == "default", "rope scaling")
        require(
            not getattr(cfg, "use_sliding_window", False),
            "use_sliding_window=true (MaxText's qwen3_moe block attends globally)",
        )
        require(not getattr(cfg, "attention_bias", False), "attention_bias=true (MaxText qwen3 blocks have no biases)")
        require(
            not (getattr(cfg, "mlp_only_layers", None) or []) and getattr(cfg, "decoder_sparse_step", 1) == 1,
            "dense layers (mlp_only_layers / decoder_sparse_step): MaxText's qwen3_moe block is MoE in every layer",
        )
        require(
            bool(getattr(cfg, "norm_topk_prob", False)),
            "norm_topk_prob=false (MaxText always softmaxes over the top-k, so its weights sum to one)",
        )
        experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
        return ModelSpec(
            **base_spec(cfg, intermediate_size=int(cfg.moe_intermediate_size)),
            options=(("num_experts", int(experts)), ("top_k", int(cfg.num_experts_per_tok))),
        )

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return (
            "pre_self_attention_layer_norm/scale",
            "self_attention/query/kernel",
            "self_attention/key/kernel",
            "self_attention/value/kernel",
            "self_attention/out/kernel",
            "self_attention/query_norm/scale",
            "self_attention/key_norm/scale",
            "post_self_attention_layer_norm/scale",
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
        q = dense(h, p["self_attention/query/kernel"], dt)
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = dense(h, p["self_attention/value/kernel"], dt)
        q = rms_norm(q, p["self_attention/query_norm/scale"], spec.norm_eps, dt)
        k = rms_norm(k, p["self_attention/key_norm/scale"], spec.norm_eps, dt)
        q = self.rope(q, positions, spec.rope_theta, dt)
        k = self.rope(k, positions, spec.rope_theta, dt)
        q = q * (spec.head_dim**-0.5)  # query_pre_attn_scalar, at run time
        x = x + dense(causal_attention(q, k, v, dt), p["self_attention/out/kernel"], dt, contract=2)
        return x, rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)

    def route(self, spec: ModelSpec, p: dict, h):
        return router_weights(h, p[f"{MOE}/gate/kernel"], spec.jdtype, top_k=spec.option("top_k"), norm_topk_prob=True)
