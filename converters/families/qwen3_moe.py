"""Qwen3-MoE (MaxText block `qwen3_moe`): Qwen3 attention (q/k RMSNorm, runtime 1/sqrt(head_dim), half-split
RoPE) and a routed MoE in every layer, no shared experts and no biases.

Per-expert HF tensors `mlp.experts.{e}.{gate,up,down}_proj.weight` are stacked into `moe_block/wi_0`,
`wi_1`, `wo` (`[E, emb, F]` / `[E, F, emb]`, scanned `[E, L, ...]`); the router `mlp.gate.weight` becomes
`moe_block/gate/kernel`. Routing (MaxText and HF agree): softmax over the top-k router logits, then
renormalised (`norm_topk_prob`).

Model names follow MaxText's configs. `qwen3-480b-a35b` is the Coder model: MaxText's own converter
registers its mapping under another name (`qwen3-coder-480b-a35b`) and so fails for it in both directions;
here it is an ordinary entry. Its published `intermediate_size` (8192) is unused -- every layer is MoE.
"""

from __future__ import annotations

from converters.core.mapping import Dims
from converters.errors import UnsupportedModelError
from converters.families import common, moe_common
from converters.families.common import L

_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}


def _published(hidden, layers, heads, kv, experts, moe_mlp, mlp, theta, max_pos, **extra) -> dict:
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        **_IDS,
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": max_pos,
        "max_window_layers": layers,
        "mlp_only_layers": [],
        "moe_intermediate_size": moe_mlp,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": theta,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    cfg.update(extra)
    return cfg


class Qwen3Moe(common.DecoderOnly):
    name = "qwen3-moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    reference = "converters.verify.reference.qwen3_moe:Qwen3MoeForward"
    test_models = {"qwen3-moe": ("qwen3-30b-a3b", {**moe_common.TINY, "moe_intermediate_size": 48, "num_experts": 4})}
    models = {
        "qwen3-30b-a3b": _published(2048, 48, 32, 4, 128, 768, 6144, 10000000.0, 262144),
        "qwen3-235b-a22b": _published(4096, 94, 64, 4, 128, 1536, 12288, 5000000.0, 262144),
        "qwen3-480b-a35b": _published(
            6144,
            62,
            96,
            8,
            160,
            2560,
            8192,
            10000000.0,
            262144,
            router_aux_loss_coef=0.0,
            shared_expert_intermediate_size=0,
        ),
    }

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = moe_common.moe_dims(
            super().dims(cfg), cfg, cls.name, experts_key="num_experts", mlp_key="moe_intermediate_size"
        )
        # MaxText's qwen3_moe block is MoE in every layer: no dense layers, no shared expert
        if cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1:
            raise UnsupportedModelError(
                "Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) has no MaxText layout"
            )
        if cfg.get("shared_expert_intermediate_size"):
            raise UnsupportedModelError("Qwen3-MoE with a shared expert has no MaxText qwen3_moe layout")
        return d

    @classmethod
    def layer_rules(cls, d: Dims):
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=False),
            *common.qk_norms(d),
            *moe_common.router(d, L + "mlp.gate", "moe_block/gate"),
            *moe_common.per_expert_glu(d, L + "mlp.experts.{e}", "moe_block", ("gate_proj", "up_proj", "down_proj")),
        ]
