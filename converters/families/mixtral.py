"""Mixtral (MaxText block `mixtral`): Llama-style attention with half-split RoPE and a top-2 routed MoE.

MaxText's mixtral attention applies no query scaling at run time, so the query kernel carries
1/sqrt(head_dim) (not a power of two for head_dim 128: bf16 round trips are within 1 ulp, not bit-exact).
Per-expert HF tensors `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate/up/down) are stacked into
`MoeBlock_0/wi_0`, `wi_1`, `wo`; the router `block_sparse_moe.gate.weight` is `MoeBlock_0/gate/kernel`.

All projections are sized from heads x head_dim, never from hidden_size (MaxText's own export of the out
kernel only works because the two are equal in the published models).
"""

from __future__ import annotations

from converters.core.mapping import Dims
from converters.families import common, moe_common
from converters.families.common import L


def _published(hidden, mlp, layers, heads, vocab, max_pos, aux, version) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": max_pos,
        "num_attention_heads": heads,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": aux,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": version,
        "use_cache": True,
        "vocab_size": vocab,
    }


class Mixtral(common.DecoderOnly):
    name = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    reference = "converters.verify.reference.mixtral:MixtralForward"
    test_models = {"mixtral": ("mixtral-8x7b", {**moe_common.TINY, "intermediate_size": 96, "num_local_experts": 4})}
    models = {
        "mixtral-8x7b": _published(4096, 14336, 32, 32, 32000, 32768, 0.02, "4.36.0.dev0"),
        "mixtral-8x22b": _published(6144, 16384, 56, 48, 32768, 65536, 0.001, "4.38.0"),
    }

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        return moe_common.moe_dims(
            super().dims(cfg), cfg, cls.name, experts_key="num_local_experts", mlp_key="intermediate_size"
        )

    @classmethod
    def layer_rules(cls, d: Dims):
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=True),
            *moe_common.router(d, L + "block_sparse_moe.gate", "MoeBlock_0/gate"),
            *moe_common.per_expert_glu(d, L + "block_sparse_moe.experts.{e}", "MoeBlock_0", ("w1", "w3", "w2")),
        ]
