"""Gemma 4 text model, dense and MoE (MaxText decoder block `gemma4`, model names `gemma4-31b`, `gemma4-26b`).

What MaxText 0.2.5 lays out and computes (src/maxtext/models/gemma4.py, layers/attentions.py, layers/embeddings.py,
layers/nnx_decoders.py, layers/moe.py, configs/models/gemma4-31b.yml and gemma4-26b.yml):

* Attention pattern fixed by MaxText: 5 sliding-window layers, then 1 global (`GEMMA4_ATTENTION_PATTERN`);
  layer l is global iff l % 6 == 5. transformers always makes the last layer global, so a model both can express
  has a multiple of 6 layers.
* Global layers have their own head_dim (`global_head_dim`, 512 for 31b) and kv heads (`global_num_kv_heads`, 4),
  and with `share_kv_projections` (HF `attention_k_eq_v`) no value projection: the keys are the values.
* RMSNorms multiply by the stored scale, and so do HF's (Gemma 4 folded the `1 + w` into its weights): the norms,
  q/k norms and `layer_scalar` are stored as is. The value norm has no scale (`v_norm_with_scale: false`).
* No runtime query scaling (the block passes `query_pre_attn_scalar=1.0`, HF's `scaling` is 1.0): kernels are
  only transposed and reshaped. RoPE is half-split (`RotaryEmbedding`); on global layers
  `Gemma4PartialRotaryEmbedding` rotates the first `global_rope_proportion` of each half, which is HF's
  `proportional` RoPE in the same layout: no permutation.
* The embedding table holds HF's table times sqrt(hidden) (float32 product, rounded once; MaxText's
  checkpoint_conversion/utils/param_mapping.py GEMMA4 hook `pad_hf_embedding_layer`); the tied output divides by
  sqrt(hidden) again (`normalize_embedding_logits`), then `final_logits_soft_cap`. This is the one scaled tensor.
* Scanned (`Gemma4ScannableBlock`, nnx_decoders.py `_init_scanned_gemma4`): one block per 6 layers,
  `decoder/scanned_blocks/local_layers/*` nested `[.., blocks, 5, ..]` (entry (b, p) = layer 6b + p) and
  `decoder/scanned_blocks/global_layer/*` `[.., blocks, ..]` (layer 6b + 5). The remainder block
  (`layers_remainder`) is empty for a multiple of 6 layers. Unscanned: `decoder/layers_<l>`.
* MoE (26b, HF `enable_moe_block`; MaxText `num_experts` > 1, every layer): the layer's `mlp` is `Gemma4MoE`. HF's
  dense `mlp.*` is its shared expert `mlp/moe_block/shared_experts/{wi_0,wi_1,wo}/kernel` (width `intermediate_size`),
  on pre_ffw_norm(x), then `mlp/post_feedforward_layernorm_1`. The routed experts run on
  `mlp/pre_feedforward_layernorm_2`(x), then `mlp/post_feedforward_layernorm_2`; the sum goes through post_ffw_norm.
  The router (`mlp/moe_block/MoeBlock_0/gate/kernel` `[emb, X]`, HF `router.proj` transposed) sees a scale-free
  RMSNorm of x times emb**-0.5 times `mlp/pre_forward_scale_2` (HF `router.scale`); weights: softmax over all
  experts, top-k by logit, renormalised (`norm_topk_prob`), times `MoeBlock_0/per_expert_scale` (HF
  `router.per_expert_scale`). HF's fused `experts.gate_up_proj` `[X, 2F, emb]` (gate rows, then up rows) splits
  into `MoeBlock_0/wi_0` / `wi_1` `[X, emb, F]`, `experts.down_proj` `[X, emb, F]` is `wo` `[X, F, emb]`: each
  expert transposed, moved as is. Scanned, the expert axis stays first: `[X, blocks, 5, ..]` / `[X, blocks, ..]`.

Multimodal checkpoints (`model_type: gemma4`, Gemma4ForConditionalGeneration, the published layout): the text
model's tensors under `model.language_model.*`, the vision tower and projector under `vision_encoder/`
(converters/families/gemma4_vision.py).

Not supported yet, refused with a reason by `dims`: per-layer embeddings and shared KV layers (e2b / e4b:
`hidden_size_per_layer_input`, `num_kv_shared_layers`; the text models convert as family gemma4-small, MaxText block
`gemma4_small`, converters/families/gemma4_small.py), bidirectional attention over all tokens.
"""

from __future__ import annotations

import dataclasses
import math

from converters.core.mapping import Dims, Family, LayerGroup, Rule
from converters.core.transforms import Scale
from converters.errors import MappingError, UnsupportedModelError
from converters.families import common, gemma4_vision, moe_common
from converters.families.common import L

PATTERN = 6  # MaxText GEMMA4_ATTENTION_PATTERN: 5 local sliding-window layers, then 1 global
LOCAL = "decoder/scanned_blocks/local_layers"
GLOBAL = "decoder/scanned_blocks/global_layer"
MLP = "mlp"  # a MoE layer's MLP (`Gemma4MoE`): the router scale and the extra norms
MOE = "mlp/moe_block/MoeBlock_0"  # its routed experts and router (`RoutedMoE`)

# transformers' Gemma4TextConfig defaults for keys a config may leave out: what transformers assumes is what the
# checkpoint means
TEXT_DEFAULTS = {
    "vocab_size": 262144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_global_key_value_heads": None,
    "attention_k_eq_v": False,
    "hidden_size_per_layer_input": 256,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
    "use_bidirectional_attention": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
}


def layer_types(n: int) -> list[str]:
    return ["full_attention" if i % PATTERN == PATTERN - 1 else "sliding_attention" for i in range(n)]


def _text(
    hidden: int, mlp: int, layers: int, heads: int, kv: int, global_kv: int, moe: tuple[int, int, int] | None = None
) -> dict:
    """The text model's HF config.json (Gemma4ForCausalLM): dimensions, window, RoPE, eps, soft-cap and vocabulary
    from MaxText's configs/models/gemma4-*.yml; token ids, dtype and the flags from the text_config of MaxText's
    checkpoint_conversion/utils/hf_model_configs.py `gemma4_31b_dict` / `gemma4_26b_dict` (the published
    google/gemma-4-31b-it / gemma-4-26b-a4b-it); eos [1, 106] is that config's top-level list. `moe`: (experts,
    experts per token, expert width) of the MoE block (the yml's num_experts, num_experts_per_tok, base_moe_mlp_dim)."""
    experts = {}
    if moe:
        experts = {"num_experts": moe[0], "top_k_experts": moe[1], "moe_intermediate_size": moe[2]}
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": True,
        "bos_token_id": 2,
        "dtype": "bfloat16",
        "enable_moe_block": bool(moe),
        **experts,
        "eos_token_id": [1, 106],
        "final_logit_softcapping": 30.0,
        "global_head_dim": 512,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "hidden_size_per_layer_input": 0,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "layer_types": layer_types(layers),
        "max_position_embeddings": 262144,
        "num_attention_heads": heads,
        "num_global_key_value_heads": global_kv,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "num_kv_shared_layers": 0,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": 1024,
        "tie_word_embeddings": True,
        "use_bidirectional_attention": "vision",
        "use_cache": True,
        "use_double_wide_mlp": False,
        "vocab_size": 262144,
        "vocab_size_per_layer_input": 262144,
    }


GEMMA4_31B = _text(5376, 21504, 60, 32, 16, 4)
# configs/models/gemma4-26b.yml: the shared MLP is base_mlp_dim (2112; moe.py RoutedAndSharedMoE sizes a gemma4 block's
# shared expert by mlp_dim), each of the 128 routed experts base_moe_mlp_dim (704)
GEMMA4_26B = _text(2816, 2112, 30, 16, 8, 2, moe=(128, 8, 704))

# Tiny test models: hidden 72 so sqrt(hidden) is not a power of two, heads x head_dim != hidden, global layers with
# another head_dim and kv heads (as 31b), a window of 8 so it acts on short prompts, a soft-cap that bites.
_TINY = {
    "hidden_size": 72,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_global_key_value_heads": 1,
    "intermediate_size": 96,
    "sliding_window": 8,
    "final_logit_softcapping": 5.0,
}
# The MoE block (as 26b): 4 experts, 2 per token, expert width 40 (neither hidden 72 nor the shared MLP's 96, so a
# projection sized from the wrong width fails on shape)
_TINY_MOE = {**_TINY, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 40}


def get(cfg: dict, key: str):
    """`cfg[key]`, or transformers' default when the key is absent."""
    return cfg[key] if key in cfg else TEXT_DEFAULTS.get(key)


def is_global(layer: int) -> bool:
    return layer % PATTERN == PATTERN - 1


def global_attention_dims(cfg: dict) -> tuple[int, int]:
    """(head_dim, kv heads) of the global layers, from the published keys (`global_head_dim`,
    `num_global_key_value_heads`) or the `per_layer_config` transformers >= 5.24 writes instead."""
    kv = get(cfg, "num_key_value_heads") or get(cfg, "num_attention_heads")
    per_layer = cfg.get("per_layer_config")
    if "global_head_dim" not in cfg and per_layer:
        entries = [dict(v) for v in per_layer.values()]
        if any(e != entries[0] for e in entries):
            raise MappingError("gemma4: per_layer_config differs between global layers; MaxText holds one shape")
        return int(entries[0].get("head_dim", get(cfg, "head_dim"))), int(entries[0].get("num_key_value_heads", kv))
    head_dim = int(get(cfg, "global_head_dim") or get(cfg, "head_dim"))
    global_kv = get(cfg, "num_global_key_value_heads") if get(cfg, "attention_k_eq_v") else None
    return head_dim, int(global_kv or kv)


def text_dims(cfg: dict, block: str, layers: int, **extra) -> Dims:
    """The Dims of a Gemma 4 text model (MaxText block `block`, gemma4 or gemma4_small): tied output, no attention
    biases, the global layers' attention shape in `extra` with the block's own entries."""
    if get(cfg, "tie_word_embeddings") is False:
        raise MappingError(f"{block}: tie_word_embeddings=false; MaxText's {block} block ties the output")
    if get(cfg, "attention_bias"):
        raise MappingError(f"{block}: attention_bias=true; MaxText's {block} block has no attention biases")
    heads = int(get(cfg, "num_attention_heads"))
    g_head_dim, g_kv = global_attention_dims(cfg)
    return Dims(
        emb=int(get(cfg, "hidden_size")),
        heads=heads,
        kv_heads=int(get(cfg, "num_key_value_heads") or heads),
        head_dim=int(get(cfg, "head_dim")),
        mlp=int(get(cfg, "intermediate_size")),
        vocab=int(get(cfg, "vocab_size")),
        layers=layers,
        tied=True,
        extra={"global_head_dim": g_head_dim, "global_kv_heads": g_kv, **extra},
    )


def moe_dims(cfg: dict) -> dict:
    """`Dims.extra` of the MoE block: routed experts, experts per token, expert width; {} without `enable_moe_block`
    (transformers builds the MoE only with it, whatever `num_experts` says)."""
    if not get(cfg, "enable_moe_block"):
        return {}
    vals = {k: get(cfg, k) for k in ("num_experts", "top_k_experts", "moe_intermediate_size")}
    missing = [k for k, v in vals.items() if not v]
    if missing:
        raise MappingError(f"gemma4: enable_moe_block=true but no {', '.join(missing)} in config.json")
    experts, top_k, width = (int(v) for v in vals.values())
    if experts < 2 or not 0 < top_k <= experts:
        raise MappingError(
            f"gemma4: num_experts={experts}, top_k_experts={top_k}; MaxText's gemma4 block routes only with >= 2 "
            "experts (num_experts > 1) and top-k among them"
        )
    return {"experts": experts, "top_k": top_k, "moe_mlp": width}


def moe_rules(d: Dims) -> list[Rule]:
    """The MLP of a MoE layer (26b; MaxText models/gemma4.py `Gemma4MoE`, layers/moe.py `RoutedAndSharedMoE` +
    `RoutedMoE`): HF's dense `mlp` is the shared expert, the router's scale and per-expert scale and the three extra
    norms move as is, the router and experts as in moe_common (fused `experts.gate_up_proj` split in halves)."""
    return [
        *common.gated_mlp(d, mt=f"{MLP}/moe_block/shared_experts"),
        common.vector(L + "pre_feedforward_layernorm_2.weight", f"{MLP}/pre_feedforward_layernorm_2/scale", d.emb),
        common.vector(L + "post_feedforward_layernorm_1.weight", f"{MLP}/post_feedforward_layernorm_1/scale", d.emb),
        common.vector(L + "post_feedforward_layernorm_2.weight", f"{MLP}/post_feedforward_layernorm_2/scale", d.emb),
        common.vector(L + "router.scale", f"{MLP}/pre_forward_scale_2", d.emb),
        *moe_common.router(d, L + "router.proj", f"{MOE}/gate"),
        common.vector(L + "router.per_expert_scale", f"{MOE}/per_expert_scale", moe_common.experts(d)),
        *moe_common.fused_glu(d, L + "experts", MOE, d.extra["moe_mlp"]),
    ]


class Gemma4(Family):
    name = "gemma4"
    model_types = ("gemma4_text", "gemma4")
    architectures = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
    reference = "converters.verify.reference.gemma4_vision:Gemma4MultimodalForward"  # Gemma4Forward + the tower
    test_models = {
        "gemma4": ("gemma4-31b", _TINY),
        "gemma4-kv": ("gemma4-31b", {**_TINY, "attention_k_eq_v": False}),
        "gemma4-moe": ("gemma4-26b", _TINY_MOE),
        # Gemma4ForConditionalGeneration: the `gemma4` text model with a tiny tower (gemma4_vision.TINY_VISION)
        "gemma4-mm": ("gemma4-31b", _TINY),
    }
    models = {"gemma4-31b": GEMMA4_31B, "gemma4-26b": GEMMA4_26B}

    @classmethod
    def accepts(cls, cfg: dict) -> bool:
        """Not the small models (per-layer inputs or shared KV layers): the registry gives those gemma4_text configs
        to `gemma4_small.Gemma4Small`."""
        text = cfg.get("text_config") or cfg
        return not (get(text, "hidden_size_per_layer_input") or get(text, "num_kv_shared_layers"))

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        # multimodal (model_type gemma4): the text model under model.language_model, the tower (gemma4_vision)
        cfg, layout = gemma4_vision.split_config(cfg)
        refuse = [
            (get(cfg, "hidden_size_per_layer_input"), "per-layer embeddings (e2b/e4b, MaxText block gemma4_small)"),
            (get(cfg, "num_kv_shared_layers"), "shared KV layers (num_kv_shared_layers)"),
            (get(cfg, "use_bidirectional_attention") == "all", "bidirectional attention over all tokens"),
        ]
        for bad, what in refuse:
            if bad:
                raise UnsupportedModelError(f"gemma4: {what} is not supported yet")
        n = int(get(cfg, "num_hidden_layers"))
        types = list(cfg.get("layer_types") or [])
        if n % PATTERN or (types and types != layer_types(n)):
            raise MappingError(
                f"gemma4: {n} layers, layer_types {types or 'default'}: MaxText fixes the pattern at 5 local + 1 "
                "global and transformers makes the last layer global, so only a multiple of 6 layers in that pattern "
                "can be converted"
            )
        return text_dims(cfg, "gemma4", n, k_eq_v=bool(get(cfg, "attention_k_eq_v")), **moe_dims(cfg), **layout)

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        return [*super().ignored(d), r"lm_head\.weight"]

    @classmethod
    def config_for_checkpoint(cls, cfg: dict, stored: set[str]) -> dict:
        return gemma4_vision.config_for_checkpoint(cfg, stored)

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        text = [
            # MaxText's table holds sqrt(hidden) (float32, as its converter's hook multiplies); its tied output divides
            # by the exact sqrt(hidden) again
            common.embedding(d, chain=(Scale(math.sqrt(d.emb)),)),
            common.vector("model.norm.weight", "decoder/decoder_norm/scale", d.emb),
        ]
        return gemma4_vision.text_names(d, text) + gemma4_vision.global_rules(d)

    @classmethod
    def kind_rules(cls, d: Dims, glob: bool) -> tuple[Rule, ...]:
        """The rules of one local or global layer (global: its own head_dim and kv heads, no value projection with
        attention_k_eq_v -- MaxText models/gemma4.py Gemma4DecoderLayer.__init__)."""
        a = d
        if glob:
            a = dataclasses.replace(d, head_dim=d.extra["global_head_dim"], kv_heads=d.extra["global_kv_heads"])
        attn = common.attention(a, rope_interleave=False, scale_query=False)
        if glob and d.extra["k_eq_v"]:
            attn = [r for r in attn if not r.mt.endswith("/value/kernel")]
        rules = (
            common.vector(L + "input_layernorm.weight", "pre_self_attention_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_norm/scale", d.emb),
            common.vector(L + "pre_feedforward_layernorm.weight", "pre_ffw_norm/scale", d.emb),
            common.vector(L + "post_feedforward_layernorm.weight", "post_ffw_norm/scale", d.emb),
            *common.qk_norms(a),
            *attn,
            *(moe_rules(d) if d.extra.get("experts") else common.gated_mlp(d)),
            common.vector(L + "layer_scalar", "layer_scalar", 1),
        )
        return tuple(gemma4_vision.text_names(d, rules))  # model.language_model.* in a multimodal checkpoint

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        return list(cls.kind_rules(d, False))

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        n = d.layers
        local = tuple(i for i in range(n) if not is_global(i))
        glob = tuple(i for i in range(n) if is_global(i))
        if not scan:
            return [
                LayerGroup(cls.kind_rules(d, False), local, None, tuple(f"decoder/layers_{i}" for i in local)),
                LayerGroup(cls.kind_rules(d, True), glob, None, tuple(f"decoder/layers_{i}" for i in glob)),
                *gemma4_vision.layer_groups(d),  # the tower is never scanned
            ]
        blocks = n // PATTERN
        return [
            LayerGroup(cls.kind_rules(d, False), local, LOCAL, (), stack=(blocks, PATTERN - 1)),
            LayerGroup(cls.kind_rules(d, True), glob, GLOBAL, ()),
            *gemma4_vision.layer_groups(d),
        ]
