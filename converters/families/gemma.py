"""Gemma2 (MaxText block `gemma2`) and Gemma3 (block `gemma3`, optional SigLIP vision tower).

What the two have in common on the MaxText side:
  * every RMSNorm multiplies by `scale` where HF multiplies by `1 + weight`: MaxText stores `weight + 1`
    (decoder norms, q/k norms, the projector's soft-embedding norm; not the vision tower's LayerNorms);
  * HF multiplies the looked-up embedding by sqrt(hidden_size) at run time, MaxText bakes it into the table
    (Gemma2: float32 sqrt; Gemma3: sqrt rounded to bfloat16, which is what HF's bf16 forward uses). The tied
    output projection divides by the exact sqrt(hidden_size) again;
  * the vocabulary differs: MaxText's gemma2 configs pad 256000 -> 256128 rows (zeros, dropped on export);
    gemma3's hold 262144 of HF's 262208 rows. The rows MaxText cannot hold are kept beside the checkpoint
    (`ckptflow/dropped_rows.safetensors`) and put back on export, see `converters.convert.dropped_rows`;
  * no lm_head / logits_dense (tied), no biases, half-split RoPE (kernels are only transposed and reshaped).

Gemma2: one MaxText layer holds a (local sliding-window, global) pair of HF layers (2m, 2m+1) under
`*_local` / `*_global` names. MaxText applies no query scaling at run time for this block, so the query
kernel carries 1/sqrt(query_pre_attn_scalar) -- the config's value (27B: 144, not head_dim 128).

Gemma3: the query is scaled at run time (nothing baked in). Scanned, layers are stacked in 6-layer blocks
(`decoder/layers/layers_<b>`, entry j = HF layer 6j+b) plus unscanned `decoder/layers_remainder/layers_<r>`;
unscanned, `decoder/layers_<l>`. MaxText's attention pattern (5 local + 1 global) is fixed, so configs
with another pattern are refused. The vision tower (never scanned) and projector live under
`vision_encoder/`. HF names are the on-disk ones of the published repos: `language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*` (multimodal, `model_type: gemma3`) or `model.*`
(text only, `gemma3_text`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from converters.core.mapping import Dims, Family, LayerGroup, Rule
from converters.core.transforms import Kernel, Offset, Permute, Reshape, Scale
from converters.errors import MappingError
from converters.families import common

GEMMA2_MT_VOCAB_PAD = 128  # MaxText gemma2-*.yml: vocab_size 256128 for HF's 256000
GEMMA3_PATTERN = 6  # MaxText GEMMA3_ATTENTION_PATTERN: 5 local sliding-window layers, then 1 global
NORM = (Offset(1.0),)
# Tiny test models: hidden 72 so sqrt(hidden) is not a power of two (8.485; bf16 8.5), query_pre_attn_scalar 24 so the
# Gemma2 query scale is not one either (like 27B's 144), small windows and soft-caps so both act on tiny prompts.
_TINY = {
    "hidden_size": 72,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "query_pre_attn_scalar": 24,
    "sliding_window": 8,
}

# transformers' defaults for keys the published configs leave out (the gemma-3-4b-it text_config omits heads,
# head_dim, vocab, ...): what transformers assumes is what the checkpoint means.
GEMMA2_DEFAULTS = {
    "vocab_size": 256000,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
}
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
}
SIGLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-06,
    "hidden_act": "gelu_pytorch_tanh",
    "vision_use_head": True,
}
GEMMA3_MM_DEFAULTS = {
    "mm_tokens_per_image": 256,
    "image_token_index": 262144,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
}

VISION_ENCODER = "vision_encoder/Gemma3VisionEncoderLayer_0"
VISION_BLOCK = VISION_ENCODER + "/Transformer/encoderblock_{i}"
PROJECTOR = "vision_encoder/VisionEmbedder_0"


def get(cfg: dict, key: str, defaults: dict):
    """`cfg[key]`, or the transformers default when the key is absent (an explicit null stays null)."""
    return cfg[key] if key in cfg else defaults.get(key)


def bf16(x: float) -> float:
    """`x` rounded to bfloat16 (nearest, ties to even), with numpy only: the registry must stay light to import."""
    bits = int(np.array([x], np.float32).view(np.uint32)[0])
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def _check_layer_types(cfg: dict, family: str, want: list[str]) -> None:
    """MaxText's gemma blocks fix the local/global order; refuse a config whose HF layers differ."""
    got = cfg.get("layer_types")
    if got is not None and list(got) != want:
        raise MappingError(
            f"{family}: config layer_types {got} do not follow MaxText's fixed pattern ({want[:GEMMA3_PATTERN]}...); "
            "MaxText cannot express this model"
        )


def _check_tied(cfg: dict, family: str) -> None:
    if cfg.get("tie_word_embeddings") is False:
        raise MappingError(
            f"{family}: tie_word_embeddings=false; MaxText's {family} block always ties the output to the embedding"
        )
    if cfg.get("attention_bias"):
        raise MappingError(f"{family}: attention_bias=true; MaxText's {family} block has no attention biases")


def _norms(E: int, prefix: str, suffix: str = "") -> list[Rule]:
    """The four RMSNorms around attention and MLP, +1 on import."""
    return [
        common.vector(prefix + "input_layernorm.weight", f"pre_self_attention_norm{suffix}/scale", E, NORM),
        common.vector(prefix + "post_attention_layernorm.weight", f"post_self_attention_norm{suffix}/scale", E, NORM),
        common.vector(prefix + "pre_feedforward_layernorm.weight", f"pre_ffw_norm{suffix}/scale", E, NORM),
        common.vector(prefix + "post_feedforward_layernorm.weight", f"post_ffw_norm{suffix}/scale", E, NORM),
    ]


class _Gemma(Family):
    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        return [*super().ignored(d), r"lm_head\.weight", r"language_model\.lm_head\.weight"]


# ------------------------------------------------------------------------------------------------- Gemma2


def _gemma2(hidden: int, mlp: int, layers: int, heads: int, kv: int, head_dim: int, qpas: int) -> dict:
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": 8192,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "pad_token_id": 0,
        "query_pre_attn_scalar": qpas,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 256000,
    }


class Gemma2(_Gemma):
    name = "gemma2"
    model_types = ("gemma2",)
    architectures = ("Gemma2ForCausalLM",)
    reference = "converters.verify.reference.gemma:Gemma2Forward"
    test_models = {"gemma2": ("gemma2-2b", {**_TINY, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 2.0})}
    models = {
        "gemma2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
        "gemma2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
        "gemma2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),  # 144 = hidden / heads, not head_dim
    }

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        _check_tied(cfg, cls.name)
        E = common.require(cfg, "hidden_size", cls.name)
        N = common.require(cfg, "num_attention_heads", cls.name)
        L = common.require(cfg, "num_hidden_layers", cls.name)
        if L % 2:
            raise MappingError(
                f"gemma2: num_hidden_layers={L} is odd; MaxText holds the layers as (local, global) pairs"
            )
        _check_layer_types(cfg, cls.name, ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)])
        vocab = get(cfg, "vocab_size", GEMMA2_DEFAULTS)
        return Dims(
            emb=E,
            heads=N,
            kv_heads=cfg.get("num_key_value_heads") or N,
            head_dim=get(cfg, "head_dim", GEMMA2_DEFAULTS),
            mlp=common.require(cfg, "intermediate_size", cls.name),
            vocab=vocab,
            layers=L,
            tied=True,
            extra={
                "mt_vocab": vocab + GEMMA2_MT_VOCAB_PAD,
                "query_pre_attn_scalar": float(get(cfg, "query_pre_attn_scalar", GEMMA2_DEFAULTS)),
            },
        )

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        return [
            common.embedding(d, mt_vocab=d.extra["mt_vocab"], chain=(Scale(math.sqrt(d.emb)),)),
            common.vector("model.norm.weight", "decoder/decoder_norm/scale", d.emb, NORM),
        ]

    @classmethod
    def sublayer_rules(cls, d: Dims, kind: str) -> list[Rule]:
        """The rules of one HF layer, named as MaxText's `kind` ("local" / "global") half of a pair."""
        attn = common.attention(d, rope_interleave=False, scale_query=False, mt=f"self_attention_{kind}")
        q = attn[0]
        # MaxText's gemma2 block applies no query scaling at run time: HF's query_pre_attn_scalar**-0.5 is baked in
        attn[0] = Rule(
            q.hf,
            q.mt,
            hf_shape=q.hf_shape,
            mt_shape=q.mt_shape,
            chain=(*q.chain, Scale(d.extra["query_pre_attn_scalar"] ** -0.5)),
        )
        return [*_norms(d.emb, common.L, f"_{kind}"), *attn, *common.gated_mlp(d, mt=f"mlp_{kind}")]

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        return cls.sublayer_rules(d, "local") + cls.sublayer_rules(d, "global")

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        pairs = d.layers // 2
        prefixes = tuple(f"decoder/layers_{m}" for m in range(pairs))
        return [
            LayerGroup(tuple(cls.sublayer_rules(d, "local")), tuple(range(0, d.layers, 2)), "decoder/layers", prefixes),
            LayerGroup(
                tuple(cls.sublayer_rules(d, "global")), tuple(range(1, d.layers, 2)), "decoder/layers", prefixes
            ),
        ]

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        out = super().export_config(cfg, dtype)
        for k, v in GEMMA2_DEFAULTS.items():  # explicit, so no transformers version's defaults can change them
            out.setdefault(k, v)
        if "rope_parameters" not in out:
            out.setdefault("rope_theta", 10000.0)
        return out


# ------------------------------------------------------------------------------------------------- Gemma3


def _gemma3(hidden: int, mlp: int, layers: int, heads: int, kv: int, head_dim: int, qpas: int) -> dict:
    text = {
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "max_position_embeddings": 131072,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "query_pre_attn_scalar": qpas,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0,
        "sliding_window": 1024,
        "sliding_window_pattern": GEMMA3_PATTERN,
        "vocab_size": 262208,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    }
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "eos_token_id": [1, 106],
        "image_token_index": 262144,
        "initializer_range": 0.02,
        "mm_tokens_per_image": 256,
        "text_config": text,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vision_config": vision,
    }


def gemma3_mt_vocab(hf_vocab: int) -> int:
    """MaxText gemma3-*.yml hold 262144 rows of HF's 262208: the vocabulary cut to a multiple of 128."""
    return hf_vocab // 128 * 128 or hf_vocab


def gemma3_layer_location(layer: int, layers: int, scanned: bool) -> tuple[str, int | None]:
    """(MaxText prefix, index along the scan axis or None) of HF decoder layer `layer` of a `layers`-layer Gemma3:
    scanned, 6-layer blocks `decoder/layers/layers_<b>` (entry j = layer 6j+b) and the unscanned remainder
    `decoder/layers_remainder/layers_<r>`; unscanned, `decoder/layers_<l>` (MaxText's gemma3 decoder layout)."""
    if not scanned:
        return f"decoder/layers_{layer}", None
    reps = layers // GEMMA3_PATTERN
    if layer < reps * GEMMA3_PATTERN:
        return f"decoder/layers/layers_{layer % GEMMA3_PATTERN}", layer // GEMMA3_PATTERN
    return f"decoder/layers_remainder/layers_{layer - reps * GEMMA3_PATTERN}", None


def gemma3_layer_types(layers: int, pattern: int = GEMMA3_PATTERN) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


class Gemma3(_Gemma):
    name = "gemma3"
    model_types = ("gemma3", "gemma3_text")
    architectures = ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")
    reference = "converters.verify.reference.gemma:Gemma3Forward"
    # text only (Gemma3ForCausalLM, model_type gemma3_text) and Gemma3ForConditionalGeneration with a tiny SigLIP tower
    test_models = {"gemma3": ("gemma3-4b", _TINY), "gemma3-mm": ("gemma3-4b", _TINY)}
    hf_aliases = (
        ("vision_tower.vision_model.", "vision_tower."),
    )  # transformers >= 5 saves the tower without `vision_model.`
    models = {
        "gemma3-4b": _gemma3(2560, 10240, 34, 8, 4, 256, 256),
        "gemma3-12b": _gemma3(3840, 15360, 48, 16, 8, 256, 256),
        "gemma3-27b": _gemma3(5376, 21504, 62, 32, 16, 128, 168),  # 168 = hidden / heads, not head_dim
    }

    @staticmethod
    def text_config(cfg: dict) -> dict:
        return (cfg.get("text_config") or {}) if cfg.get("model_type") == "gemma3" else cfg

    @classmethod
    def text_only(cls, cfg: dict) -> dict:
        """The `gemma3_text` (Gemma3ForCausalLM) config of a multimodal config's language model."""
        t = {k: v for k, v in cls.text_config(cfg).items() if k not in ("architectures",)}
        t.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], tie_word_embeddings=True)
        for k in ("eos_token_id", "torch_dtype", "dtype"):  # the published eos list [1, 106] sits at the top level
            if cfg.get(k) is not None:
                t[k] = cfg[k]
        return t

    @classmethod
    def config_for_checkpoint(cls, cfg: dict, stored: set[str]) -> dict:
        """A checkpoint without the vision tower (MaxText `use_multimodal=false`, its default for gemma3) exports
        as the text model, Gemma3ForCausalLM, even when the config is the published multimodal one."""
        if cfg.get("model_type") == "gemma3" and not any(k.startswith("vision_encoder/") for k in stored):
            warnings.warn(
                "the checkpoint has no vision tower (MaxText use_multimodal=false): writing the text model only, "
                "Gemma3ForCausalLM (model_type gemma3_text)",
                stacklevel=3,
            )
            return cls.text_only(cfg)
        return cfg

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        multimodal = cfg.get("model_type") == "gemma3"
        t = cls.text_config(cfg)
        _check_tied(cfg, cls.name)
        _check_tied(t, cls.name)
        g = lambda k: get(t, k, GEMMA3_TEXT_DEFAULTS)  # noqa: E731
        L = g("num_hidden_layers")
        pattern = t.get("sliding_window_pattern", t.get("_sliding_window_pattern", GEMMA3_PATTERN))
        if "layer_types" not in t and pattern != GEMMA3_PATTERN:
            raise MappingError(
                f"gemma3: sliding_window_pattern={pattern}; MaxText's gemma3 block fixes it at {GEMMA3_PATTERN}"
            )
        _check_layer_types(t, cls.name, gemma3_layer_types(L))
        N = g("num_attention_heads")
        vocab = g("vocab_size")
        extra = {
            "mt_vocab": gemma3_mt_vocab(vocab),
            "prefix": "language_model.model." if multimodal else "model.",
            "vision": None,
        }
        if multimodal:
            v = cfg.get("vision_config") or {}
            gv = lambda k: get(v, k, SIGLIP_DEFAULTS)  # noqa: E731
            if gv("vision_use_head"):
                raise MappingError(
                    "gemma3: vision_config.vision_use_head=true; Gemma3's SigLIP tower (and MaxText's) has no pooling "
                    "head"
                )
            Hv, Nv = gv("hidden_size"), gv("num_attention_heads")
            side = gv("image_size") // gv("patch_size")
            extra["vision"] = {
                "hidden": Hv,
                "heads": Nv,
                "head_dim": Hv // Nv,
                "mlp": gv("intermediate_size"),
                "layers": gv("num_hidden_layers"),
                "channels": gv("num_channels"),
                "patch": gv("patch_size"),
                "patches": side * side,
            }
        return Dims(
            emb=g("hidden_size"),
            heads=N,
            kv_heads=g("num_key_value_heads") or N,
            head_dim=g("head_dim"),
            mlp=g("intermediate_size"),
            vocab=vocab,
            layers=L,
            tied=True,
            extra=extra,
        )

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        p = d.extra["prefix"]
        scale = bf16(math.sqrt(d.emb))  # what MaxText's converter bakes in, and HF's bf16 forward multiplies by
        rules = [
            # HF's float32 forward multiplies by the exact sqrt(hidden): that is what MaxText's table means to it
            common.embedding(
                d,
                hf=p + "embed_tokens.weight",
                mt_vocab=d.extra["mt_vocab"],
                chain=(Scale(scale),),
                runtime_chain=(Scale(math.sqrt(d.emb)),),
            ),
            common.vector(p + "norm.weight", "decoder/decoder_norm/scale", d.emb, NORM),
        ]
        v = d.extra["vision"]
        if v is not None:
            H, P, C = v["hidden"], v["patch"], v["channels"]
            e = "vision_tower.vision_model."
            rules += [
                Rule(
                    e + "embeddings.patch_embedding.weight",
                    f"{VISION_ENCODER}/embedding/kernel",
                    hf_shape=(H, C, P, P),
                    mt_shape=(P, P, C, H),
                    chain=(Permute((2, 3, 1, 0)),),
                ),
                common.vector(e + "embeddings.patch_embedding.bias", f"{VISION_ENCODER}/embedding/bias", H),
                Rule(
                    e + "embeddings.position_embedding.weight",
                    f"{VISION_ENCODER}/pos_embedding",
                    hf_shape=(v["patches"], H),
                    mt_shape=(1, v["patches"], H),
                    chain=(Reshape((1, v["patches"], H), (v["patches"], H)),),
                ),
                common.vector(e + "post_layernorm.weight", f"{VISION_ENCODER}/Transformer/encoder_norm/scale", H),
                common.vector(e + "post_layernorm.bias", f"{VISION_ENCODER}/Transformer/encoder_norm/bias", H),
                Rule(
                    "multi_modal_projector.mm_input_projection_weight",
                    f"{PROJECTOR}/mm_input_projection/w",
                    hf_shape=(H, d.emb),
                    mt_shape=(H, d.emb),
                ),
                common.vector(
                    "multi_modal_projector.mm_soft_emb_norm.weight",
                    f"{PROJECTOR}/mm_soft_embedding_norm/scale",
                    H,
                    NORM,
                ),
            ]
        return rules

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        p = d.extra["prefix"] + "layers.{i}."
        return [
            *_norms(d.emb, p),
            *common.qk_norms(d, prefix=p, chain=NORM),
            *common.attention(d, rope_interleave=False, scale_query=False, prefix=p),
            *common.gated_mlp(d, prefix=p),
        ]

    @classmethod
    def vision_rules(cls, d: Dims) -> list[Rule]:
        v = d.extra["vision"]
        H, Nv, Dv, F = v["hidden"], v["heads"], v["head_dim"], v["mlp"]
        b = "vision_tower.vision_model.encoder.layers.{i}."
        att = "MultiHeadDotProductAttention_0"
        rules = [
            common.vector(b + "layer_norm1.weight", "LayerNorm_0/scale", H),  # true LayerNorms: no +1
            common.vector(b + "layer_norm1.bias", "LayerNorm_0/bias", H),
            common.vector(b + "layer_norm2.weight", "LayerNorm_1/scale", H),
            common.vector(b + "layer_norm2.bias", "LayerNorm_1/bias", H),
        ]
        for hf, mt in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules.append(
                Rule(
                    b + f"self_attn.{hf}.weight",
                    f"{att}/{mt}/kernel",
                    hf_shape=(Nv * Dv, H),
                    mt_shape=(H, Nv, Dv),
                    chain=(Kernel((H, Nv, Dv)),),
                )
            )
            rules.append(
                Rule(
                    b + f"self_attn.{hf}.bias",
                    f"{att}/{mt}/bias",
                    hf_shape=(Nv * Dv,),
                    mt_shape=(Nv, Dv),
                    chain=(Reshape((Nv, Dv), (Nv * Dv,)),),
                )
            )
        rules += [
            Rule(
                b + "self_attn.out_proj.weight",
                f"{att}/out/kernel",
                hf_shape=(H, Nv * Dv),
                mt_shape=(Nv, Dv, H),
                chain=(Kernel((Nv, Dv, H), n_in=2),),
            ),
            common.vector(b + "self_attn.out_proj.bias", f"{att}/out/bias", H),
            Rule(
                b + "mlp.fc1.weight",
                "MlpBlockViT_0/Dense_0/kernel",
                hf_shape=(F, H),
                mt_shape=(H, F),
                chain=(Kernel((H, F)),),
            ),
            common.vector(b + "mlp.fc1.bias", "MlpBlockViT_0/Dense_0/bias", F),
            Rule(
                b + "mlp.fc2.weight",
                "MlpBlockViT_0/Dense_1/kernel",
                hf_shape=(H, F),
                mt_shape=(F, H),
                chain=(Kernel((F, H)),),
            ),
            common.vector(b + "mlp.fc2.bias", "MlpBlockViT_0/Dense_1/bias", H),
        ]
        return rules

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        rules = tuple(cls.layer_rules(d))
        where = [gemma3_layer_location(l, d.layers, scan) for l in range(d.layers)]
        stacks: dict[str, list[int]] = {}
        for l, (prefix, j) in enumerate(where):
            if j is not None:
                stacks.setdefault(prefix, []).append(l)
        groups = [LayerGroup(rules, tuple(ls), prefix, ()) for prefix, ls in stacks.items()]
        rest = [l for l, (_, j) in enumerate(where) if j is None]
        if rest:
            groups.append(LayerGroup(rules, tuple(rest), None, tuple(where[l][0] for l in rest)))
        v = d.extra["vision"]
        if v is not None:  # never scanned
            n = v["layers"]
            groups.append(
                LayerGroup(
                    tuple(cls.vision_rules(d)), tuple(range(n)), None, tuple(VISION_BLOCK.format(i=i) for i in range(n))
                )
            )
        return groups

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        out = super().export_config(cfg, dtype)
        t = out
        if out.get("model_type") == "gemma3":
            t = out["text_config"] = dict(out.get("text_config") or {})
            v = out["vision_config"] = dict(out.get("vision_config") or {})
            for k, val in SIGLIP_DEFAULTS.items():
                v.setdefault(k, val)
            v["vision_use_head"] = False
            for k, val in GEMMA3_MM_DEFAULTS.items():
                out.setdefault(k, val)
        # explicit values, so that no transformers version's defaults can change what the weights mean
        for k, val in GEMMA3_TEXT_DEFAULTS.items():
            t.setdefault(k, val)
        if "rope_parameters" not in t:
            t.setdefault("rope_theta", 1000000.0)
            t.setdefault("rope_local_base_freq", 10000.0)
        if "layer_types" not in t:
            t.setdefault("sliding_window_pattern", GEMMA3_PATTERN)
        return out
