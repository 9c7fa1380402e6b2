"""Qwen3-Next (MaxText block `qwen3_next`): a repeating cycle of `full_attention_interval` (4) layers -- gated-delta-net
(linear attention) layers, then one full-attention layer -- each with a routed MoE plus a sigmoid-gated shared expert.

Layout (MaxText 0.2.5's model tree: `src/maxtext/models/qwen3.py` `Qwen3NextScannableBlock`, scanned by
`src/maxtext/layers/nnx_decoders.py` `_init_scanned_qwen3_next`; the same paths as
`src/maxtext/checkpoint_conversion/utils/param_mapping.py` `QWEN3_NEXT_MAXTEXT_TO_HF_PARAM_MAPPING`):
  * scanned: one scanned block per cycle (B = layers / 4 blocks). `decoder/layers/local_layers/*` holds the cycle's
    gated-delta-net layers as a nested stack, `[d0, B, 3, d1, ...]` (block b, position p: HF layer 4b + p; experts
    `[E, B, 3, ...]`), `decoder/layers/global_layer/*` its full-attention layer, `[d0, B, d1, ...]` (HF layer 4b + 3);
  * unscanned `decoder/layers_<i>`;
  * older ckptflow versions (and MaxText 0.2.5's standalone `convert_qwen3_next_scanned.py`, which the 0.2.5 model
    does not load) wrote the scanned model as one stack per cycle position, `decoder/layers/layer_<p>` (HF layers
    p, p+4, ...): still read for export and verification (`legacy_layouts`), never written;
  * full attention under `attention/attention`: `query` `[emb, H, 2*head_dim]` (per head `[query | output gate]`, HF's
    own split), `key` / `value` `[emb, K, head_dim]`, `out` 2-D `[H*head_dim, emb]`, `query_norm` / `key_norm`;
  * gated delta net under `attention`: `in_proj_qkvz` / `in_proj_ba` transposed only (HF's per-key-head grouping is
    kept), `conv1d` `[C, 1, k]` <-> `[k, 1, C]`, `A_log`, `dt_bias`, `norm/rms_norm/scale`, `out_proj` transposed;
  * `mlp/routed_experts` (router `gate`, stacked `wi_0`/`wi_1`/`wo`), `mlp/shared_expert/{wi_0,wi_1,wo}`,
    `mlp/shared_expert_gate` `[emb, 1]`;
  * the zero-centred (1 + w) norms are stored as HF stores them on both sides (identity).
MaxText sizes the shared expert with the routed experts' width, so configs with another
`shared_expert_intermediate_size` are refused, as are dense layers (`mlp_only_layers`, `decoder_sparse_step` != 1) and
layer types other than the fixed cycle. The published repos' `mtp.*` tensors are skipped (as by transformers).
MaxText's own to-HF export of this model
gets the gated-delta-net shapes wrong (`QWEN3_NEXT_HF_WEIGHTS_TO_SHAPE` in its
`src/maxtext/checkpoint_conversion/utils/hf_shape.py` sizes the value heads, and with them `in_proj_qkvz`, `conv1d`,
`out_proj` and `norm`, with the full-attention `head_dim` instead of `linear_value_head_dim`); here both directions
come from the same rules.
"""

from __future__ import annotations

from converters.core.mapping import Dims, LayerGroup, Rule, require
from converters.core.transforms import Kernel, Permute
from converters.errors import UnsupportedModelError
from converters.families import common, moe_common
from converters.families.common import L


def _published() -> dict:
    """Qwen/Qwen3-Next-80B-A3B-Instruct config.json."""
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151645,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "moe_intermediate_size": 512,
        "norm_topk_prob": True,
        "num_attention_heads": 16,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "num_hidden_layers": 48,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }


class Qwen3Next(common.DecoderOnly):
    name = "qwen3-next"
    model_types = ("qwen3_next",)
    architectures = ("Qwen3NextForCausalLM",)
    reference = "converters.verify.reference.qwen3_next:Qwen3NextForward"
    # 2 key / 4 value GDN heads with key dim 16 != value dim 24, full attention head_dim 32 with 8 rotary dims
    test_models = {
        "qwen3-next": (
            "qwen3-next-80b-a3b",
            {
                **moe_common.TINY,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                "num_experts": 8,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "linear_key_head_dim": 16,
                "linear_value_head_dim": 24,
                "intermediate_size": 96,
            },
        )
    }
    models = {"qwen3-next-80b-a3b": _published()}
    # the published repos also hold a multi-token-prediction module `mtp.*` that transformers (and MaxText) do not load
    ignored_hf = (r".*rotary_emb\.inv_freq", r"mtp\..*")

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = moe_common.moe_dims(
            super().dims(cfg), cfg, cls.name, experts_key="num_experts", mlp_key="moe_intermediate_size"
        )
        interval = int(cfg.get("full_attention_interval") or 4)
        kinds = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(d.layers)]
        if cfg.get("layer_types") is not None and list(cfg["layer_types"]) != kinds:
            raise UnsupportedModelError(
                f"Qwen3-Next layer_types must repeat {interval - 1} linear_attention then full_attention (MaxText's "
                f"cycle)"
            )
        if cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1:
            raise UnsupportedModelError(
                "Qwen3-Next with dense layers (mlp_only_layers / decoder_sparse_step != 1) has no MaxText layout"
            )
        if (cfg.get("shared_expert_intermediate_size") or d.mlp) != d.mlp:
            raise UnsupportedModelError(
                "Qwen3-Next with shared_expert_intermediate_size != moe_intermediate_size has no MaxText layout "
                "(MaxText sizes the shared expert like the routed ones)"
            )
        d.extra.update(
            interval=interval,
            kinds=kinds,
            conv=require(cfg, "linear_conv_kernel_dim", cls.name),
            key_heads=require(cfg, "linear_num_key_heads", cls.name),
            value_heads=require(cfg, "linear_num_value_heads", cls.name),
            key_dim=require(cfg, "linear_key_head_dim", cls.name),
            value_dim=require(cfg, "linear_value_head_dim", cls.name),
        )
        return d

    @classmethod
    def full_attention_rules(cls, d: Dims) -> list[Rule]:
        E, N, K, D = d.emb, d.heads, d.kv_heads, d.head_dim
        a, mt = L + "self_attn.", "attention/attention"
        return [
            Rule(
                a + "q_proj.weight",
                f"{mt}/query/kernel",
                hf_shape=(N * 2 * D, E),
                mt_shape=(E, N, 2 * D),
                chain=(Kernel((E, N, 2 * D)),),
            ),
            Rule(
                a + "k_proj.weight",
                f"{mt}/key/kernel",
                hf_shape=(K * D, E),
                mt_shape=(E, K, D),
                chain=(Kernel((E, K, D)),),
            ),
            Rule(
                a + "v_proj.weight",
                f"{mt}/value/kernel",
                hf_shape=(K * D, E),
                mt_shape=(E, K, D),
                chain=(Kernel((E, K, D)),),
            ),
            Rule(
                a + "o_proj.weight",
                f"{mt}/out/kernel",
                hf_shape=(E, N * D),
                mt_shape=(N * D, E),
                chain=(Kernel((N * D, E)),),
            ),
            *common.qk_norms(d, mt=mt, dim=D),
        ]

    @classmethod
    def linear_attention_rules(cls, d: Dims) -> list[Rule]:
        E, x = d.emb, d.extra
        key, value = x["key_heads"] * x["key_dim"], x["value_heads"] * x["value_dim"]
        qkvz, ba, conv = 2 * key + 2 * value, 2 * x["value_heads"], 2 * key + value
        a, mt = L + "linear_attn.", "attention"
        return [
            Rule(
                a + "in_proj_qkvz.weight",
                f"{mt}/in_proj_qkvz/kernel",
                hf_shape=(qkvz, E),
                mt_shape=(E, qkvz),
                chain=(Kernel((E, qkvz)),),
            ),
            Rule(
                a + "in_proj_ba.weight",
                f"{mt}/in_proj_ba/kernel",
                hf_shape=(ba, E),
                mt_shape=(E, ba),
                chain=(Kernel((E, ba)),),
            ),
            Rule(
                a + "conv1d.weight",
                f"{mt}/conv1d/kernel",
                hf_shape=(conv, 1, x["conv"]),
                mt_shape=(x["conv"], 1, conv),
                chain=(Permute((2, 1, 0)),),
            ),
            common.vector(a + "A_log", f"{mt}/A_log", x["value_heads"]),
            common.vector(a + "dt_bias", f"{mt}/dt_bias", x["value_heads"]),
            common.vector(a + "norm.weight", f"{mt}/norm/rms_norm/scale", x["value_dim"]),
            Rule(
                a + "out_proj.weight",
                f"{mt}/out_proj/kernel",
                hf_shape=(E, value),
                mt_shape=(value, E),
                chain=(Kernel((value, E)),),
            ),
        ]

    @classmethod
    def mlp_rules(cls, d: Dims) -> list[Rule]:
        E, F = d.emb, d.mlp
        m, mt = L + "mlp.", "mlp"
        return [
            common.vector(L + "input_layernorm.weight", "input_layernorm/scale", E),
            common.vector(L + "post_attention_layernorm.weight", "post_attention_layernorm/scale", E),
            *moe_common.router(d, m + "gate", f"{mt}/routed_experts/gate"),
            *moe_common.per_expert_glu(
                d, m + "experts.{e}", f"{mt}/routed_experts", ("gate_proj", "up_proj", "down_proj")
            ),
            Rule(
                m + "shared_expert.gate_proj.weight",
                f"{mt}/shared_expert/wi_0/kernel",
                hf_shape=(F, E),
                mt_shape=(E, F),
                chain=(Kernel((E, F)),),
            ),
            Rule(
                m + "shared_expert.up_proj.weight",
                f"{mt}/shared_expert/wi_1/kernel",
                hf_shape=(F, E),
                mt_shape=(E, F),
                chain=(Kernel((E, F)),),
            ),
            Rule(
                m + "shared_expert.down_proj.weight",
                f"{mt}/shared_expert/wo/kernel",
                hf_shape=(E, F),
                mt_shape=(F, E),
                chain=(Kernel((F, E)),),
            ),
            Rule(
                m + "shared_expert_gate.weight",
                f"{mt}/shared_expert_gate/kernel",
                hf_shape=(1, E),
                mt_shape=(E, 1),
                chain=(Kernel((E, 1)),),
            ),
        ]

    @classmethod
    def kind_rules(cls, d: Dims, kind: str) -> tuple[Rule, ...]:
        attn = cls.full_attention_rules(d) if kind == "full_attention" else cls.linear_attention_rules(d)
        return tuple(attn + cls.mlp_rules(d))

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        return list(cls.kind_rules(d, "linear_attention"))

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        n, c, kinds = d.layers, d.extra["interval"], d.extra["kinds"]
        if not scan:
            return [
                LayerGroup(
                    cls.kind_rules(d, kind),
                    tuple(i for i in range(n) if kinds[i] == kind),
                    None,
                    tuple(f"decoder/layers_{i}" for i in range(n) if kinds[i] == kind),
                )
                for kind in ("linear_attention", "full_attention")
            ]
        if n % c:
            raise UnsupportedModelError(
                f"a scanned Qwen3-Next checkpoint needs a multiple of {c} layers, config has {n}"
            )
        # one scanned block per cycle: its linear-attention layers stacked again inside it (`local_layers`, nested
        # [blocks, c - 1]), its last layer the full-attention one (`global_layer`, [blocks]) -- MaxText
        # src/maxtext/models/qwen3.py Qwen3NextScannableBlock.__init__
        blocks = n // c
        local = tuple(b * c + p for b in range(blocks) for p in range(c - 1))
        full = tuple(b * c + c - 1 for b in range(blocks))
        return [
            LayerGroup(
                cls.kind_rules(d, "linear_attention"), local, "decoder/layers/local_layers", (), stack=(blocks, c - 1)
            ),
            LayerGroup(cls.kind_rules(d, "full_attention"), full, "decoder/layers/global_layer", ()),
        ]

    @classmethod
    def legacy_layouts(cls, d: Dims) -> dict[str, list[LayerGroup]]:
        """`layer_<p>`: one stack per cycle position (older ckptflow; MaxText's standalone converter)."""
        n, c, kinds = d.layers, d.extra["interval"], d.extra["kinds"]
        if n % c:
            return {}
        stacks = [
            LayerGroup(cls.kind_rules(d, kinds[p]), tuple(range(p, n, c)), f"decoder/layers/layer_{p}", ())
            for p in range(c)
        ]
        return {"layer_<p>": stacks}
