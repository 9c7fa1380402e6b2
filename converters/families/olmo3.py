"""OLMo 3 (MaxText decoder block `olmo3`): post-norms only, q/k RMSNorm over the whole projection, a fixed pattern
of three sliding-window layers and one full-attention layer.

What MaxText 0.2.5 lays out and computes (src/maxtext/models/olmo3.py, layers/attentions.py,
layers/normalizations.py, layers/nnx_decoders.py):

* A layer has no pre-norm. `Olmo3DecoderLayer`: attention(x) -> `post_self_attention_layer_norm` -> + x;
  mlp(that) -> `post_mlp_layer_norm` -> + it. HF's `post_attention_layernorm` / `post_feedforward_layernorm`
  are those two norms, plain RMSNorms (stored as is, no `1 + w`).
* The attention module is the attribute `attention`, so its arrays are `attention/query/kernel`, ... (not
  `self_attention/`). `use_qk_norm`: layers/attentions.py picks `GlobalRMSNorm` for model names starting with
  `olmo3`, which normalizes q over all heads together (`query_norm/scale` is `[heads * head_dim]`, k's
  `[kv_heads * head_dim]`): HF's `q_norm` / `k_norm` weights unchanged.
* The block passes `query_pre_attn_scalar = head_dim**-0.5`, applied to q at run time, and RoPE is the
  half-split `RotaryEmbedding` / `YarnRotaryEmbedding` with `rope_interleave: false`: q/k/v/o kernels are only
  transposed and reshaped. Every tensor round-trips bit-exact.
* Layer l attends within `sliding_window_size` unless l % 4 == 3 (`OLMO3_ATTENTION_PATTERN`; HF's default
  `layer_types`). Scanned, `Olmo3ScannableBlock` holds one period: `decoder/layers/layers_<b>` stacks HF layers
  b, b + 4, b + 8, ... (entry j = layer 4j + b), `num_decoder_layers / 4` entries and no remainder, so a scanned
  checkpoint needs a multiple of 4 layers. Unscanned, `decoder/layers_<l>`.

MaxText only imports OLMo 3 (checkpoint_conversion's param_mapping.py has the HF -> MaxText direction); ckptflow
converts both ways from the same rules.

RoPE difference MaxText has (not a layout matter; see converters/verify/reference/olmo3.py): models/olmo3.py gives
every layer `config.rope_type`, so with the YaRN of olmo3-7b / olmo3-32b MaxText rotates the sliding-window layers
with YaRN too, where transformers (and the published model) uses plain RoPE on them.
"""

from __future__ import annotations

from converters.core.mapping import Dims, LayerGroup, Rule
from converters.errors import MappingError
from converters.families import common
from converters.families.common import L

PATTERN = ("sliding_attention", "sliding_attention", "sliding_attention", "full_attention")  # OLMO3_ATTENTION_PATTERN
MT = "attention"  # the olmo3 block's attention attribute

# configs/models/olmo3-7b.yml, olmo3-32b.yml: YaRN from 8192 to 65536 positions (HF's rope_scaling as published;
# attention_factor = 0.1 ln(8) + 1, which is what MaxText's rope_attention_scaling multiplies by)
YARN = {
    "attention_factor": 1.2079441541679836,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "yarn",
}


def layer_types(n: int) -> list[str]:
    return [PATTERN[i % len(PATTERN)] for i in range(n)]


def _published(hidden: int, mlp: int, layers: int, heads: int, kv: int, *, yarn: bool) -> dict:
    """The HF config.json of a MaxText olmo3 model, built without the hub: dimensions, eps, theta, window, vocab and
    rope scaling from MaxText's configs/models/olmo3-*.yml; pad id 100277 from MaxText's
    checkpoint_conversion/utils/hf_model_configs.py; eos 100257 (the Dolma 2 tokenizer's end of text; transformers'
    Olmo3Config default, 50279, is OLMo 1's); the rest transformers' Olmo3Config defaults, written out."""
    return {
        "architectures": ["Olmo3ForCausalLM"],
        "model_type": "olmo3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": 100257,
        "pad_token_id": 100277,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "layer_types": layer_types(layers),
        "max_position_embeddings": 65536 if yarn else 8192,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(YARN) if yarn else None,
        "rope_theta": 500000,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 100278,
    }


# Tiny test models: heads x head_dim (128) != hidden (64), 2 kv heads of 4 (q_norm and k_norm differ in size), a
# window shorter than the tests' prompts, a pad id inside the tiny vocabulary. `olmo3` keeps the published YaRN with
# its context shrunk 8192 -> 128 (verify's 500-token prompt goes past it) and 65536 -> 1024; `olmo3-pt` is the stage
# 1/2 model: plain RoPE. Scanned conversions need 4, 8, ... layers (`layers=8` in the tests).
_TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 96,
    "sliding_window": 16,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
}


class Olmo3(common.DecoderOnly):
    name = "olmo3"
    model_types = ("olmo3",)
    architectures = ("Olmo3ForCausalLM",)
    reference = "converters.verify.reference.olmo3:Olmo3Forward"
    test_models = {
        "olmo3": ("olmo3-7b", {**_TINY, "rope_scaling": {**YARN, "original_max_position_embeddings": 128}}),
        "olmo3-pt": ("olmo3-7b-pt", dict(_TINY)),
    }
    models = {
        # allenai/Olmo-3-7B-Instruct / -Think, and Olmo-3-1025-7B after its stage 3 (YaRN to 65536)
        "olmo3-7b": _published(4096, 11008, 32, 32, 32, yarn=True),
        # allenai/Olmo-3-1025-7B at its stage 1 / stage 2 revisions: rope_scaling null, 8192 positions
        "olmo3-7b-pt": _published(4096, 11008, 32, 32, 32, yarn=False),
        # allenai/Olmo-3-1125-32B, Olmo-3-32B-Think, Olmo-3.1-32B-Instruct
        "olmo3-32b": _published(5120, 27648, 64, 40, 8, yarn=True),
    }

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = super().dims(cfg)
        types = cfg.get("layer_types")
        if types is not None and list(types) != layer_types(d.layers):
            raise MappingError(
                f"olmo3: layer_types {list(types)[:8]}... do not follow MaxText's fixed pattern (3 sliding-window "
                "layers, then 1 full-attention layer); MaxText cannot express this model"
            )
        if cfg.get("attention_bias"):
            raise MappingError(
                "olmo3: attention_bias=true; the published OLMo 3 models and MaxText's olmo3 configs have no "
                "attention biases"
            )
        return d

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        a = L + "self_attn."
        return [
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_feedforward_layernorm.weight", "post_mlp_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=False, mt=MT),
            # GlobalRMSNorm: one scale over all heads, [heads * head_dim] as in HF
            common.vector(a + "q_norm.weight", f"{MT}/query_norm/scale", d.heads * d.head_dim),
            common.vector(a + "k_norm.weight", f"{MT}/key_norm/scale", d.kv_heads * d.head_dim),
            *common.gated_mlp(d),
        ]

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        n, rules, p = d.layers, tuple(cls.layer_rules(d)), len(PATTERN)
        if not scan:
            return [LayerGroup(rules, tuple(range(n)), None, tuple(f"decoder/layers_{i}" for i in range(n)))]
        if n % p:
            raise MappingError(
                f"olmo3: a scanned checkpoint needs a multiple of {p} layers (MaxText scans {p}-layer blocks "
                f"and keeps no remainder), config has {n}; convert with --no-scan"
            )
        return [LayerGroup(rules, tuple(range(b, n, p)), f"decoder/layers/layers_{b}", ()) for b in range(p)]
