"""GPT-OSS (MaxText block `gpt_oss`): alternating sliding-window / full attention with sinks and biases, and
a routed MoE with biases and a clipped SwiGLU.

Layout:
  * scanned, layers form two interleaved stacks: `decoder/layers/layers_0` holds HF layers 0, 2, 4, ...
    (sliding window), `decoder/layers/layers_1` layers 1, 3, 5, ... (full attention); unscanned,
    `decoder/layers_<i>`. MaxText's pattern is fixed, so configs with other `layer_types` are refused;
  * attention `GptOssAttention`: q/k/v/o kernels and biases, `sinks` (one logit per query head), runtime
    1/sqrt(head_dim), half-split YaRN RoPE -- kernels are only transposed and reshaped;
  * router `mlp.router` -> `GptOssMlp/gate` (kernel and bias);
  * HF stores each layer's experts fused, `[E, ...]`: `gate_up_proj` `[E, emb, 2F]` has gate and up
    interleaved on the last axis (even columns gate -> `wi_0`, odd columns up -> `wi_1`), with its bias
    `[E, 2F]` split the same way; `down_proj` `[E, F, emb]` is already MaxText's `wo` layout, `down_proj_bias`
    `[E, emb]` is `wo_bias`. The kernels are read one expert at a time.

The published models have emb == F == 2880: every expert matrix is square, so an orientation mistake keeps
every shape. Only values (round trips, logits) catch it.

The official `openai/gpt-oss-*` repos store the expert kernels as MXFP4 (`*_blocks` + `*_scales`); they are
decoded while reading (`converters.io.quantized`), and exports are plain bf16 without `quantization_config`.
"""

from __future__ import annotations

from converters.core.mapping import Dims, LayerGroup, Rule
from converters.core.transforms import Deinterleave
from converters.errors import UnsupportedModelError
from converters.families import common, moe_common
from converters.families.common import L

PATTERN = ("sliding_attention", "full_attention")  # MaxText GPT_OSS_ATTENTION_PATTERN, repeated


def _published(layers: int, experts: int) -> dict:
    """openai/gpt-oss-* config.json without its MXFP4 quantization_config (= the BF16 repos MaxText uses)."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": [PATTERN[i % 2] for i in range(layers)],
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 201088,
    }


class GptOss(common.DecoderOnly):
    name = "gpt-oss"
    model_types = ("gpt_oss",)
    architectures = ("GptOssForCausalLM",)
    reference = "converters.verify.reference.gpt_oss:GptOssForward"
    # square experts (intermediate == hidden, as 2880 == 2880) so only values catch an orientation mistake, and a
    # sliding
    # window the long verification prompt crosses many times
    test_models = {
        "gpt-oss": (
            "gpt-oss-20b",
            {
                **moe_common.TINY,
                "intermediate_size": 64,
                "num_local_experts": 4,
                "experts_per_token": 2,
                "sliding_window": 32,
                "pad_token_id": 0,
            },
        )
    }
    models = {"gpt-oss-20b": _published(24, 32), "gpt-oss-120b": _published(36, 128)}

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = moe_common.moe_dims(
            super().dims(cfg), cfg, cls.name, experts_key="num_local_experts", mlp_key="intermediate_size"
        )
        types = cfg.get("layer_types")
        if types is not None and list(types) != [PATTERN[i % 2] for i in range(d.layers)]:
            raise UnsupportedModelError(
                f"GPT-OSS layer_types must alternate {PATTERN[0]}/{PATTERN[1]} (MaxText's fixed pattern)"
            )
        return d

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        n, rules = d.layers, tuple(cls.layer_rules(d))
        if not scan:
            return [LayerGroup(rules, tuple(range(n)), None, tuple(f"decoder/layers_{i}" for i in range(n)))]
        if n % len(PATTERN):
            raise UnsupportedModelError(f"a scanned GPT-OSS checkpoint needs an even number of layers, config has {n}")
        return [
            LayerGroup(rules, tuple(range(b, n, len(PATTERN))), f"decoder/layers/layers_{b}", ())
            for b in range(len(PATTERN))
        ]

    @classmethod
    def layer_rules(cls, d: Dims):
        E, F, X = d.emb, d.mlp, moe_common.experts(d)
        a, m, mt = L + "self_attn.", L + "mlp.experts.", "GptOssMlp"
        gate_up = Deinterleave(2, axis=-1)  # even columns gate (wi_0), odd columns up (wi_1)
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=False, mt="GptOssAttention"),
            *common.qkv_bias(d, mt="GptOssAttention"),
            common.vector(a + "o_proj.bias", "GptOssAttention/out/bias", d.emb),
            common.vector(a + "sinks", "GptOssAttention/sinks", d.heads),
            *moe_common.router(d, L + "mlp.router", f"{mt}/gate", bias=True),
            Rule(
                m + "gate_up_proj",
                (f"{mt}/wi_0", f"{mt}/wi_1"),
                hf_shape=(E, 2 * F),
                mt_shape=(E, F),
                experts=X,
                split=gate_up,
            ),
            Rule(
                m + "gate_up_proj_bias",
                (f"{mt}/wi_0_bias", f"{mt}/wi_1_bias"),
                hf_shape=(X, 2 * F),
                mt_shape=(X, F),
                split=gate_up,
            ),
            Rule(m + "down_proj", f"{mt}/wo", hf_shape=(F, E), mt_shape=(F, E), experts=X),
            Rule(m + "down_proj_bias", f"{mt}/wo_bias", hf_shape=(X, E), mt_shape=(X, E)),
        ]
