"""Mistral 7B (MaxText decoder block `mistral`): Llama's parameter tree, half-split RoPE, query scale baked in.

MaxText's `mistral` block (src/maxtext/models/mistral.py) is the llama2 layer: pre-attention RMSNorm, attention,
residual, post-attention RMSNorm, SiLU-gated `mlp/wi_0, wi_1, wo`, residual, under the same parameter names.
Two things decide the layout of q and k:

* RoPE: layers/attentions.py `init_rotary_embedding` picks the interleaved `LLaMARotaryEmbedding` only for model
  names (or rope types) starting with `llama3.1`; `mistral-7b` gets the half-split `RotaryEmbedding`, which is the
  layout HF stores, so q and k are NOT permuted. Reusing Llama 3.1's mapping (halves -> interleaved pairs) pairs
  the wrong dimensions at the wrong frequencies: exact at position 0, increasingly wrong beyond it.
* Query scale: the block sets no `query_pre_attn_scalar` and MaxText's attention kernels use scale 1.0
  (layers/attentions.py, layers/attention_op.py), so 1/sqrt(head_dim) is baked into `query/kernel`, as for Mixtral.
  For head_dim 128 that factor is not a power of two: round trips are within 1 ulp on the query, bit-exact elsewhere.

The block attends globally: its Attention is built without `attention_type` / `sliding_window_size`, and the config
keys cannot give it a window. MaxText's configs/models/mistral-7b.yml (vocab 32000, `rope_max_timescale` 1e6, no
window) is therefore Mistral-7B-(Instruct-)v0.2, whose published config is `models["mistral-7b"]`. Other Mistral 7B
releases convert by their own config.json; loading them in MaxText under `mistral-7b` needs the yml's differences
overridden (v0.1: `rope_max_timescale=10000`, and its 4096-token window is not applied; v0.3: `vocab_size=32768`).
"""

from __future__ import annotations

from converters.core.mapping import Dims
from converters.families import common
from converters.families.common import L

# mistralai/Mistral-7B-Instruct-v0.2 config.json (MaxText's mistral-7b.yml: vocab 32000, rope theta 1e6, no window)
MISTRAL_7B_INSTRUCT_V02 = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


class Mistral(common.DecoderOnly):
    name = "mistral"
    model_types = ("mistral",)
    architectures = ("MistralForCausalLM",)
    reference = "converters.verify.reference.mistral:MistralForward"
    # heads * head_dim (128) != hidden (64): catches projections sized from hidden_size. The published model has no
    # window; `mistral-window` sets one shorter than verify's long prompt, as Mistral-7B-v0.1's config does (4096).
    test_models = {
        "mistral": (
            "mistral-7b",
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 96,
            },
        ),
        "mistral-window": (
            "mistral-7b",
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 96,
                "sliding_window": 32,
                "rope_theta": 10000.0,
            },
        ),
    }
    models = {"mistral-7b": MISTRAL_7B_INSTRUCT_V02}

    @classmethod
    def layer_rules(cls, d: Dims):
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=True),
            *common.gated_mlp(d),
        ]
