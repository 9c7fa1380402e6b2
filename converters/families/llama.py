"""Llama 3.1 (MaxText decoder block `llama2`): RoPE pairs interleaved and 1/sqrt(head_dim) baked into the query."""

from __future__ import annotations

from converters.core.mapping import Dims
from converters.families import common
from converters.families.common import L

_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _published(hidden: int, mlp: int, layers: int, heads: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(_ROPE),
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }


class Llama31(common.DecoderOnly):
    name = "llama3.1"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    reference = "converters.verify.reference.llama:Llama31Forward"
    # The tiny test model (converters/tiny_models.py): heads * head_dim != hidden catches projections sized from hidden.
    test_models = {
        "llama3.1": (
            "llama3.1-8b",
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 96,
            },
        )
    }
    models = {
        "llama3.1-8b": _published(4096, 14336, 32, 32),
        "llama3.1-70b": _published(8192, 28672, 80, 64),
        "llama3.1-405b": _published(16384, 53248, 126, 128),
    }

    @classmethod
    def layer_rules(cls, d: Dims):
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=True, scale_query=True),
            *common.gated_mlp(d),
        ]
