"""DeepSeek-V2 (V2-Lite), DeepSeek-V3 and DeepSeek-V3.2 (MaxText block `deepseek`, attention `mla`).

Layout (as MaxText's own converter writes it:
`src/maxtext/checkpoint_conversion/standalone_scripts/convert_deepseek_family_ckpt.py` in
AI-Hypercomputer/maxtext):
  * the first `first_k_dense_replace` layers have a dense gated MLP, the rest a DeepSeek MoE block; they form
    two separate stacks: scanned `decoder/dense_layers` (HF layers 0..k-1) and `decoder/moe_layers` (HF layers
    k..N-1), each with the layer axis at 1; unscanned `decoder/dense_layers_<i>` and `decoder/moe_layers_<j>`
    with j = HF index - k;
  * multi-head latent attention under `self_attention`: `wq_a` / `q_norm` / `wq_b` (q_lora_rank > 0) or plain
    `query` (V2-Lite, `q_lora_rank` null), `wkv_a` (`[kv_latent | k_rope]` outputs), `kv_norm`, `wkv_b`
    (`[H, k_nope | v]`), `out`. Heads keep DeepSeek's interleaved-pair RoPE layout on both sides (HF and
    MaxText rotate the same pairs): kernels are only transposed and reshaped, no permutation and no query
    scaling (MaxText applies qk_head_dim**-0.5 times the YaRN mscale**2 at run time);
  * MoE block `DeepSeekMoeBlock_0`: router `MoeBlock_0/gate/kernel` (+ V3's `e_score_correction_bias` as
    `gate/bias`, kept in float32 in the checkpoint and on export, as HF keeps it), routed experts stacked into
    `MoeBlock_0/wi_0`, `wi_1`, `wo` (`[E, ...]`, scanned `[E, L, ...]`), shared experts (n_shared_experts x
    moe_intermediate_size wide) under `shared_experts`.

V3.2 adds the sparse-attention indexer to every layer's attention (`self_attn.indexer.*` <->
`self_attention/indexer/*`): `wq_b` `[Hi*Di, q_lora]` -> `[q_lora, Hi, Di]`, `wk` -> `[emb, Di]`, LayerNorm `k_norm`
weight and bias (`scale`, `bias`), `weights_proj` `[Hi, emb]` -> `[emb, Hi]`, kept in float32 like the router's
correction
bias (transformers keeps it in float32). MaxText converts V3.2 only HF -> MaxText; ckptflow also exports it back as a
`deepseek_v32` folder transformers loads.

Only MaxText's own layout is supported: every layer after the dense ones is MoE (`moe_layer_freq` 1) and there
is at least one shared expert.

Multi-token prediction (V3 / V3.2: HF layer `num_hidden_layers` + j for j < `num_nextn_predict_layers`, not part of
transformers' model): skipped by default, as MaxText's converter does; with `--with-mtp` (plan extra "mtp") it is
written
as MaxText's legacy converter lays it out, unscanned, under `mtp_block/mtp_layer_<j+1>/`: `mtp_<j+1>_embedding_norm`
(`enorm`), `mtp_<j+1>_hidden_state_norm` (`hnorm`), `mtp_<j+1>_projection` (`eh_proj` `[emb, 2 emb]` transposed; input
`[embedding norm | hidden norm]` in both), `mtp_<j+1>_transformer_layer/<MoE layer>`. The layer's `embed_tokens`,
`shared_head.norm` and `shared_head.head` are not stored (MaxText shares the main model's) and are not exported.
"""

from __future__ import annotations

from dataclasses import replace

from converters.core.mapping import Dims, LayerGroup, Rule, require
from converters.core.transforms import Kernel
from converters.errors import UnsupportedModelError
from converters.families import common, moe_common
from converters.families.common import L

MOE = "DeepSeekMoeBlock_0"
ROUTED = f"{MOE}/MoeBlock_0"

_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096, "type": "yarn"}


def _v2_lite() -> dict:
    """deepseek-ai/DeepSeek-V2-Lite config.json (the `auto_map` remote-code entries dropped)."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 102400,
    }


def _v3() -> dict:
    """deepseek-ai/DeepSeek-V3 config.json, as bf16 (its FP8 `quantization_config` is decoded on read)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 3,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "initializer_range": 0.02,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 129280,
    }


# Tiny test models (MLA): heads * v_head_dim (96) and heads * qk_head_dim (112) differ from hidden (64); 8 experts.
_TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 20,
    "qk_rope_head_dim": 8,
    "v_head_dim": 24,
    "first_k_dense_replace": 1,
}


class _DeepSeek(common.DecoderOnly):
    reference = "converters.verify.reference.deepseek:DeepSeekForward"
    correction_bias = False  # V3: the router has `e_score_correction_bias`

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = super().dims(cfg)
        d = moe_common.moe_dims(d, cfg, cls.name, experts_key="n_routed_experts", mlp_key="moe_intermediate_size")
        nope, rope, v = (require(cfg, k, cls.name) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        d.head_dim = nope + rope
        d.kv_heads = d.heads
        first = int(cfg.get("first_k_dense_replace") or 0)
        shared = int(cfg.get("n_shared_experts") or 0)
        if not 0 <= first < d.layers:
            raise UnsupportedModelError(
                f"DeepSeek first_k_dense_replace={first} must be below num_hidden_layers={d.layers}"
            )
        if (cfg.get("moe_layer_freq") or 1) != 1:
            raise UnsupportedModelError(
                "DeepSeek with moe_layer_freq != 1 has no MaxText layout (every layer after the dense ones is MoE)"
            )
        if shared < 1:
            raise UnsupportedModelError("DeepSeek without shared experts has no MaxText deepseek layout")
        d.extra.update(
            dense_mlp=require(cfg, "intermediate_size", cls.name),
            first_dense=first,
            shared_mlp=shared * d.mlp,
            mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
            q_lora=int(cfg.get("q_lora_rank") or 0),
            kv_lora=require(cfg, "kv_lora_rank", cls.name),
            nope=nope,
            rope=rope,
            v=v,
        )
        return d

    @classmethod
    def attention_rules(cls, d: Dims) -> list[Rule]:
        E, H, QK, V = d.emb, d.heads, d.head_dim, d.extra["v"]
        C, R, Q = d.extra["kv_lora"], d.extra["rope"], d.extra["q_lora"]
        a, mt = L + "self_attn.", "self_attention"
        if Q:
            q = [
                Rule(
                    a + "q_a_proj.weight",
                    f"{mt}/wq_a/kernel",
                    hf_shape=(Q, E),
                    mt_shape=(E, Q),
                    chain=(Kernel((E, Q)),),
                ),
                common.vector(a + "q_a_layernorm.weight", f"{mt}/q_norm/scale", Q),
                Rule(
                    a + "q_b_proj.weight",
                    f"{mt}/wq_b/kernel",
                    hf_shape=(H * QK, Q),
                    mt_shape=(Q, H, QK),
                    chain=(Kernel((Q, H, QK)),),
                ),
            ]
        else:
            q = [
                Rule(
                    a + "q_proj.weight",
                    f"{mt}/query/kernel",
                    hf_shape=(H * QK, E),
                    mt_shape=(E, H, QK),
                    chain=(Kernel((E, H, QK)),),
                )
            ]
        return [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", E),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", E),
            *q,
            Rule(
                a + "kv_a_proj_with_mqa.weight",
                f"{mt}/wkv_a/kernel",
                hf_shape=(C + R, E),
                mt_shape=(E, C + R),
                chain=(Kernel((E, C + R)),),
            ),
            common.vector(a + "kv_a_layernorm.weight", f"{mt}/kv_norm/scale", C),
            Rule(
                a + "kv_b_proj.weight",
                f"{mt}/wkv_b/kernel",
                hf_shape=(H * (d.extra["nope"] + V), C),
                mt_shape=(C, H, d.extra["nope"] + V),
                chain=(Kernel((C, H, d.extra["nope"] + V)),),
            ),
            Rule(
                a + "o_proj.weight",
                f"{mt}/out/kernel",
                hf_shape=(E, H * V),
                mt_shape=(H, V, E),
                chain=(Kernel((H, V, E), n_in=2),),
            ),
        ]

    @staticmethod
    def glu(d: Dims, hf: str, mt: str, width: int) -> list[Rule]:
        E, F = d.emb, width
        return [
            Rule(
                f"{hf}.gate_proj.weight", f"{mt}/wi_0/kernel", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),)
            ),
            Rule(
                f"{hf}.up_proj.weight", f"{mt}/wi_1/kernel", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),)
            ),
            Rule(
                f"{hf}.down_proj.weight", f"{mt}/wo/kernel", hf_shape=(E, F), mt_shape=(F, E), chain=(Kernel((F, E)),)
            ),
        ]

    @classmethod
    def dense_rules(cls, d: Dims) -> list[Rule]:
        return [*cls.attention_rules(d), *cls.glu(d, L + "mlp", "mlp", d.extra["dense_mlp"])]

    @classmethod
    def moe_rules(cls, d: Dims) -> list[Rule]:
        X = moe_common.experts(d)
        rules = [*cls.attention_rules(d), *moe_common.router(d, L + "mlp.gate", f"{ROUTED}/gate")]
        if cls.correction_bias:
            rules.append(
                Rule(
                    L + "mlp.gate.e_score_correction_bias",
                    f"{ROUTED}/gate/bias",
                    hf_shape=(X,),
                    mt_shape=(X,),
                    dtype="float32",
                )
            )
        rules += moe_common.per_expert_glu(d, L + "mlp.experts.{e}", ROUTED, ("gate_proj", "up_proj", "down_proj"))
        rules += cls.glu(d, L + "mlp.shared_experts", f"{MOE}/shared_experts", d.extra["shared_mlp"])
        return rules

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        return cls.moe_rules(d)

    @classmethod
    def optional_groups(cls, d: Dims) -> dict[str, list[LayerGroup]]:
        if not cls.correction_bias or not d.extra["mtp_layers"]:
            return {}
        E, groups = d.emb, []
        for j in range(1, d.extra["mtp_layers"] + 1):
            m = f"mtp_{j}_"
            rules = [
                common.vector(L + "enorm.weight", f"{m}embedding_norm/scale", E),
                common.vector(L + "hnorm.weight", f"{m}hidden_state_norm/scale", E),
                Rule(
                    L + "eh_proj.weight",
                    f"{m}projection/kernel",
                    hf_shape=(E, 2 * E),
                    mt_shape=(2 * E, E),
                    chain=(Kernel((2 * E, E)),),
                ),
                *(replace(r, mt=f"{m}transformer_layer/{r.mt}") for r in cls.moe_rules(d)),
            ]
            groups.append(LayerGroup(tuple(rules), (d.layers + j - 1,), None, (f"mtp_block/mtp_layer_{j}",)))
        return {"mtp": groups}

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        mtp = [rf"model\.layers\.{d.layers + j}\..*" for j in range(d.extra["mtp_layers"])]
        return super().ignored(d) + mtp

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        k, n = d.extra["first_dense"], d.layers
        groups = []
        if k:
            groups.append(
                LayerGroup(
                    tuple(cls.dense_rules(d)),
                    tuple(range(k)),
                    "decoder/dense_layers",
                    tuple(f"decoder/dense_layers_{i}" for i in range(k)),
                )
            )
        groups.append(
            LayerGroup(
                tuple(cls.moe_rules(d)),
                tuple(range(k, n)),
                "decoder/moe_layers",
                tuple(f"decoder/moe_layers_{j}" for j in range(n - k)),
            )
        )
        return groups


def _v32() -> dict:
    """deepseek-ai/DeepSeek-V3.2 config.json, as bf16: V3 plus the indexer sizes."""
    return {
        **_v3(),
        "architectures": ["DeepseekV32ForCausalLM"],
        "model_type": "deepseek_v32",
        "index_head_dim": 128,
        "index_n_heads": 64,
        "index_topk": 2048,
    }


def _kimi_k2() -> dict:
    """moonshotai/Kimi-K2-Instruct config.json (MaxText `kimi-k2-1t`, configs/models/kimi-k2-1t.yml), as bf16 (its FP8
    `quantization_config` is decoded on read), the `auto_map` remote-code entries dropped: DeepSeek-V3's architecture
    with 64 heads, 384 routed experts, one dense layer, no multi-token prediction, ungrouped routing, its own YaRN."""
    return {
        **_v3(),
        "model_type": "kimi_k2",
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 131072,
        "n_group": 1,
        "n_routed_experts": 384,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "num_nextn_predict_layers": 0,
        "rope_scaling": {
            **_YARN,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "topk_group": 1,
        "vocab_size": 163840,
    }


KIMI_K2_THINKING_INT4_GROUP = 32
# moonshotai/Kimi-K2-Thinking's quantization_config: only the routed experts are int4 (compressed-tensors
# pack-quantized, symmetric, groups of 32 inputs); attention, shared experts and the dense MLP stay bf16
KIMI_K2_THINKING_QUANTIZATION = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": KIMI_K2_THINKING_INT4_GROUP,
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}

# HF `model_type`s that transformers builds as another one: Kimi-K2's `kimi_k2` is DeepSeek-V3 under its own name
# (the hub repos map it to their remote DeepseekV3 code; transformers' own kimi_k25 maps its `kimi_k2` text config to
# deepseek_v3 the same way). ckptflow never runs remote code.
TRANSFORMERS_MODEL_TYPE = {"kimi_k2": "deepseek_v3"}


def as_transformers_builds_it(config: dict) -> dict:
    """`config` under the model_type transformers builds it as (Kimi-K2's `kimi_k2` -> `deepseek_v3`), else itself."""
    mt = config.get("model_type")
    return {**config, "model_type": TRANSFORMERS_MODEL_TYPE[mt]} if mt in TRANSFORMERS_MODEL_TYPE else config


class DeepSeek2(_DeepSeek):
    name = "deepseek2"
    model_types = ("deepseek_v2",)
    architectures = ("DeepseekV2ForCausalLM",)
    models = {"deepseek2-16b": _v2_lite()}
    test_models = {"deepseek2": ("deepseek2-16b", {**_TINY, "num_experts_per_tok": 3})}


class DeepSeek3(_DeepSeek):
    name = "deepseek3"
    architectures = ("DeepseekV3ForCausalLM",)
    # Kimi-K2 (`kimi_k2`, DeepseekV3ForCausalLM) is this architecture with its own config; exported as deepseek_v3
    model_types = ("deepseek_v3", "kimi_k2")
    models = {"deepseek3-671b": _v3(), "kimi-k2-1t": _kimi_k2()}
    # 4 routing groups of which 2 are kept, so group-limited routing acts; the published YaRN (factor 40, mscale) kept
    test_models = {
        "deepseek3": (
            "deepseek3-671b",
            {**_TINY, "q_lora_rank": 48, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
        )
    }
    correction_bias = True

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        """A Kimi-K2 source exports as `deepseek_v3` (transformers has no `kimi_k2`; its repos load it only through
        their remote code, which `auto_map` names): the same architecture, so transformers loads it natively."""
        out = super().export_config(cfg, dtype)
        if out.get("model_type") in TRANSFORMERS_MODEL_TYPE:
            out["model_type"] = TRANSFORMERS_MODEL_TYPE[out["model_type"]]
            out["architectures"] = list(cls.architectures[:1])
            out.pop("auto_map", None)
        return out


class DeepSeek32(DeepSeek3):
    name = "deepseek3.2"
    model_types = ("deepseek_v32",)
    architectures = ("DeepseekV32ForCausalLM",)
    models = {"deepseek3.2-671b": _v32()}
    # the indexer keeps 32 keys per query, so prompts longer than 32 tokens attend sparsely. 16 indexer heads: a key
    # scores
    # exactly 0 only when all 16 ReLUs are 0, so exact ties at the top-k boundary (which torch and JAX may break
    # differently) are practically absent
    test_models = {
        "deepseek3.2": (
            "deepseek3.2-671b",
            {
                **_TINY,
                "q_lora_rank": 48,
                "n_group": 4,
                "topk_group": 2,
                "num_experts_per_tok": 3,
                "index_n_heads": 16,
                "index_head_dim": 16,
                "index_topk": 32,
            },
        )
    }

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = super().dims(cfg)
        if not d.extra["q_lora"]:
            raise UnsupportedModelError("DeepSeek-V3.2 needs a query LoRA (q_lora_rank): the indexer reads its output")
        d.extra.update(
            index_heads=require(cfg, "index_n_heads", cls.name), index_dim=require(cfg, "index_head_dim", cls.name)
        )
        return d

    @classmethod
    def attention_rules(cls, d: Dims) -> list[Rule]:
        E, Q, Hi, Di = d.emb, d.extra["q_lora"], d.extra["index_heads"], d.extra["index_dim"]
        a, mt = L + "self_attn.indexer.", "self_attention/indexer"
        return [
            *super().attention_rules(d),
            Rule(
                a + "wq_b.weight",
                f"{mt}/wq_b/kernel",
                hf_shape=(Hi * Di, Q),
                mt_shape=(Q, Hi, Di),
                chain=(Kernel((Q, Hi, Di)),),
            ),
            Rule(a + "wk.weight", f"{mt}/wk/kernel", hf_shape=(Di, E), mt_shape=(E, Di), chain=(Kernel((E, Di)),)),
            common.vector(a + "k_norm.weight", f"{mt}/k_norm/scale", Di),
            common.vector(a + "k_norm.bias", f"{mt}/k_norm/bias", Di),
            Rule(
                a + "weights_proj.weight",
                f"{mt}/weights_proj/kernel",
                hf_shape=(Hi, E),
                mt_shape=(E, Hi),
                chain=(Kernel((E, Hi)),),
                dtype="float32",
            ),
        ]
