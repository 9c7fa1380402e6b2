"""Qwen2.5 (MaxText block `qwen2`: q/k/v biases) and Qwen3 dense (block `qwen3`: q/k RMSNorm).

Both apply 1/sqrt(head_dim) at run time and use HF's half-split RoPE, so kernels are only transposed and
reshaped. Small sizes tie the embedding and have no `logits_dense`.
"""

from __future__ import annotations

from converters.core.mapping import Dims
from converters.families import common
from converters.families.common import L

_QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}


def _qwen25(hidden, mlp, layers, heads, kv, vocab, tied, window_layers) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        **_QWEN_IDS,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": 32768,
        "max_window_layers": window_layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072 if not tied else 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def _qwen3(hidden, mlp, layers, heads, tied) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        **_QWEN_IDS,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": 40960,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }


class _Qwen(common.DecoderOnly):
    @classmethod
    def attention_extras(cls, d: Dims):
        return []

    @classmethod
    def layer_rules(cls, d: Dims):
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=False),
            *cls.attention_extras(d),
            *common.gated_mlp(d),
        ]


class Qwen25(_Qwen):
    name = "qwen2.5"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)
    reference = "converters.verify.reference.qwen:Qwen25Forward"
    test_models = {
        "qwen2.5": (
            "qwen2.5-7b",
            {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96},
        )
    }
    models = {
        "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, 151936, True, 21),
        "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, 152064, False, 28),
        "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, 152064, False, 70),
    }

    @classmethod
    def attention_extras(cls, d: Dims):
        return common.qkv_bias(d)


class Qwen3(_Qwen):
    name = "qwen3"
    model_types = ("qwen3",)
    architectures = ("Qwen3ForCausalLM",)
    reference = "converters.verify.reference.qwen:Qwen3Forward"
    test_models = {
        "qwen3": (
            "qwen3-0.6b",
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
        "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
        "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
        "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
        "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
        "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
        "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    }

    @classmethod
    def attention_extras(cls, d: Dims):
        return common.qk_norms(d)
