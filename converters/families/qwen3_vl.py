"""Qwen3-VL's language model (MaxText `qwen3-vl-2b`, `qwen3-vl-4b`: block `qwen3`; `qwen3-vl-30b-a3b`: block
`qwen3_moe`).

What MaxText 0.2.5 lays out and computes for the text model (configs/models/qwen3-vl-*.yml, models/qwen3.py,
layers/embeddings.py `Qwen3OmniMoeThinkerTextRotaryEmbedding`):
  * the Qwen3 / Qwen3-MoE decoder layer, the same tree as `qwen3` / `qwen3-moe` here: q/k RMSNorm, runtime
    1/sqrt(head_dim), no biases, half-split RoPE (kernels only transposed and reshaped; every tensor round-trips
    bit-exact); 2b/4b tie the embedding (`logits_via_embedding`), 30b-a3b has `logits_dense`;
  * `use_mrope: true`, `mrope_section [24, 20, 20]`: multimodal RoPE, always interleaved (frequency j takes the
    temporal, height or width position by j mod 3 within the sections). A text token's three positions are its
    one position, so for text it is plain half-split RoPE at angle position * (1 / theta^(2j/D)) -- what the
    reference computes;
  * the vision tower (`vision_encoder/...`, `use_multimodal: true`): converters/families/qwen3_vl_vision.py. Its
    deepstack features are added to the hidden states after the first decoder layers, which MaxText 0.2.5 runs
    only with `scan_layers=false` (configs/types.py refuses deepstack with scan_layers=true), so MaxText loads
    the unscanned layout only. The tower itself is never scanned and is converted in both layouts, as Gemma3's:
    a scanned checkpoint holds the whole model and verifies and exports like the unscanned one.

HF layout (transformers `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration`, model types
`qwen3_vl` / `qwen3_vl_moe`): the language model under `model.language_model.*`, `lm_head.weight` at the top
(absent when tied), the vision tower under `model.visual.*`. Tying is the top-level `tie_word_embeddings`
(the text_config's is not what transformers reads). The MoE experts are fused per layer, as published and as
MaxText's own hook reads them: `mlp.experts.gate_up_proj` `[X, emb, 2F]` (gate columns, then up columns ->
`wi_0`, `wi_1` without a transpose) and `mlp.experts.down_proj` `[X, F, emb]` (= `wo`). transformers >= 5 saves
them as it holds them, transposed (`[X, 2F, emb]`: gate rows, then up rows; `[X, emb, F]`), and reads both (by
shape). Which one a folder holds follows its config's `transformers_version` (the published repos say 4.57); it is
read and exported in that layout, and the shape check refuses a folder that says otherwise.

transformers has no text-only causal LM for Qwen3-VL (`Qwen3VLTextModel` has no LM head), so model types
`qwen3_vl_text` / `qwen3_vl_moe_text` are refused. A MaxText checkpoint without the vision tower (MaxText
`use_multimodal=false`) exports as the equivalent text model, `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`
(per-expert tensors): for text the two compute the same thing (see above).
"""

from __future__ import annotations

import copy
import warnings
from typing import ClassVar

from converters.core.mapping import Dims, LayerGroup, Rule
from converters.core.transforms import Chunks, Kernel
from converters.errors import UnsupportedModelError
from converters.families import common, moe_common, qwen3_vl_vision
from converters.families.qwen3_moe import Qwen3Moe

TEXT = "model.language_model."  # the language model in the multimodal checkpoints
MROPE = {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}
_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}
_MM_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}


def _vision(model_type, depth, hidden, mlp, out, deepstack) -> dict:
    return {
        "deepstack_visual_indexes": deepstack,
        "depth": depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "model_type": model_type,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": out,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _published(hidden, mlp, layers, heads, kv, tied, vision, moe: dict | None = None) -> dict:
    """The Qwen/Qwen3-VL-*-Instruct config.json (transformers 4.57 layout: `rope_scaling` + `rope_theta`)."""
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        **_IDS,
        "dtype": "bfloat16",
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(MROPE),
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    }
    if moe:
        text.update(moe)
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": tied,
        "transformers_version": "4.57.0.dev0",
        "vision_config": vision,
        **_MM_IDS,
    }


_MOE_30B = {
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_experts": 128,
    "num_experts_per_tok": 8,
}

# Tiny test models: heads x head_dim != hidden, GQA, an mrope_section of head_dim / 2 = 16 frequencies (MaxText
# refuses any other sum), and a tiny vision tower (deepstack after both blocks).
_TINY_TEXT = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
TINY_MROPE = [6, 5, 5]
TINY_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 2,
    "patch_size": 4,
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [0, 1],
}


def tiny_multimodal(cfg: dict, dims: dict, *, layers: int, vocab: int, tied: bool | None) -> dict:
    """A tiny Qwen3-VL config from a published one (converters/tiny_models.py `tiny_config`)."""
    cfg = copy.deepcopy(cfg)
    t = cfg["text_config"]
    t.update(dims, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    t["rope_scaling"] = {**t["rope_scaling"], "mrope_section": list(TINY_MROPE)}
    cfg["vision_config"].update(TINY_VISION, out_hidden_size=t["hidden_size"])
    # the image / video / vision start and end tokens inside the tiny vocabulary (its last four ids)
    for i, k in enumerate(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")):
        cfg[k] = vocab - 4 + i
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    return cfg


def saved_by_transformers_5(cfg: dict) -> bool:
    """Whether the folder's fused experts are transformers >= 5's in-memory transpose: its config says it was written
    by transformers 5 or later (the published Qwen3-VL-MoE repos: 4.57.0.dev0, the layout MaxText's hook reads)."""
    major = str(cfg.get("transformers_version") or "0").split(".")[0]
    return major.isdigit() and int(major) >= 5


class _Qwen3VLBase(common.DecoderOnly):
    multimodal_type: ClassVar[str]  # model_type of the multimodal config
    text_only: ClassVar[dict]  # the text model a checkpoint without vision tower exports as: model_type, architecture
    ignored_hf = (*common.DecoderOnly.ignored_hf,)

    # ---- where the vision tower joins (converters/families/qwen3_vl_vision.py) ------------------------------
    # With `vision_tower` False a multimodal checkpoint would convert its language model only (MaxText
    # use_multimodal=false): `model.visual.*` skipped with a warning. A MaxText checkpoint without the tower exports
    # as the text model either way.
    vision_tower: ClassVar[bool] = True

    @classmethod
    def vision_rules(cls, d: Dims) -> list[Rule]:
        """The tower's global rules (patch embedding, positions, deepstack mergers, projector); d.extra["vision"] is
        vision_config."""
        return qwen3_vl_vision.vision_rules(qwen3_vl_vision.vision_dims(d.extra["vision"], d.emb))

    @classmethod
    def vision_groups(cls, d: Dims) -> list[LayerGroup]:
        """The tower's blocks (never scanned)."""
        return qwen3_vl_vision.vision_groups(qwen3_vl_vision.vision_dims(d.extra["vision"], d.emb))

    # ---- config ---------------------------------------------------------------------------------------------
    @classmethod
    def multimodal(cls, cfg: dict) -> bool:
        return cfg.get("model_type") == cls.multimodal_type

    @classmethod
    def text_config(cls, cfg: dict) -> dict:
        return (cfg.get("text_config") or {}) if cls.multimodal(cfg) else cfg

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        mt = cfg.get("model_type")
        if mt not in (cls.multimodal_type, cls.text_only["model_type"]):
            raise UnsupportedModelError(
                f"{cls.name}: model_type {mt!r} is the headless Qwen3-VL text model (transformers has no text-only "
                f"Qwen3-VL causal LM); convert the {cls.architectures[0]} checkpoint"
            )
        multimodal = cls.multimodal(cfg)
        t = cls.text_config(cfg)
        d = super().dims(t)
        # transformers ties by the top-level flag of the multimodal config (Qwen3VLConfig's default: false)
        d.tied = bool(cfg.get("tie_word_embeddings", False))
        if t.get("attention_bias"):
            raise UnsupportedModelError(f"{cls.name}: attention_bias=true (MaxText's qwen3 blocks have no biases)")
        vision = cfg.get("vision_config") if multimodal else None
        d.extra.update(prefix=TEXT if multimodal else "model.", vision=vision, fused_experts=multimodal)
        if vision is not None and not cls.vision_tower:
            warnings.warn(
                f"{cls.name}: the vision tower (model.visual.*) is not converted: the language model only, as MaxText "
                "with use_multimodal=false",
                stacklevel=3,
            )
        return d

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        out = super().ignored(d)
        if d.extra["vision"] is not None and not cls.vision_tower:
            out.append(r"model\.visual\..*")
        return out

    @classmethod
    def text_only_config(cls, cfg: dict) -> dict:
        """The text model's config (Qwen3ForCausalLM / Qwen3MoeForCausalLM) of a multimodal config."""
        t = {k: v for k, v in cls.text_config(cfg).items() if k not in ("rope_scaling", "rope_parameters", "dtype")}
        rp = cls.text_config(cfg).get("rope_parameters") or {}  # transformers >= 5 writes rope_theta in here
        t.update(
            cls.text_only,
            architectures=[cls.text_only["architectures"]],
            rope_theta=rp.get("rope_theta", t.get("rope_theta")),
            rope_scaling=None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=None,
            use_sliding_window=False,
            max_window_layers=t.get("num_hidden_layers"),
        )
        for k in ("torch_dtype", "dtype"):
            if cfg.get(k) is not None:
                t[k] = cfg[k]
        return dict(sorted(t.items()))

    @classmethod
    def config_for_checkpoint(cls, cfg: dict, stored: set[str]) -> dict:
        """A checkpoint without the vision tower (MaxText use_multimodal=false) exports as the text model, once the
        family converts the tower. Until then every checkpoint of a multimodal config lacks it, and keeps the
        multimodal config and names (so verify compares it with its source folder)."""
        if cls.multimodal(cfg) and not any(k.startswith("vision_encoder/") for k in stored):
            if not cls.vision_tower:
                warnings.warn(
                    f"{cls.name}: the checkpoint has no vision tower: an export holds the language model only "
                    "(transformers initialises model.visual.* randomly; text logits are unaffected)",
                    stacklevel=3,
                )
                return cfg
            warnings.warn(
                f"{cls.name}: the checkpoint has no vision tower (MaxText use_multimodal=false): writing the text "
                f"model only, {cls.text_only['architectures']} (model_type {cls.text_only['model_type']})",
                stacklevel=3,
            )
            return cls.text_only_config(cfg)
        return cfg

    # ---- rules ----------------------------------------------------------------------------------------------
    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        p = d.extra["prefix"]
        rules = [
            common.embedding(d, hf=p + "embed_tokens.weight"),
            common.vector(p + "norm.weight", "decoder/decoder_norm/scale", d.emb),
        ]
        if not d.tied:
            rules.append(common.lm_head(d))
        if d.extra["vision"] is not None and cls.vision_tower:
            rules += cls.vision_rules(d)
        return rules

    @classmethod
    def mlp_rules(cls, d: Dims, p: str) -> list[Rule]:
        raise NotImplementedError

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        p = d.extra["prefix"] + "layers.{i}."
        return [
            common.vector(p + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", d.emb),
            common.vector(p + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", d.emb),
            *common.attention(d, rope_interleave=False, scale_query=False, prefix=p),
            *common.qk_norms(d, prefix=p),
            *cls.mlp_rules(d, p),
        ]

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        groups = super().layer_groups(d, scan)
        if d.extra["vision"] is not None and cls.vision_tower:
            groups += cls.vision_groups(d)
        return groups

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        out = super().export_config(cfg, dtype)
        if cls.multimodal(cfg):
            t = out["text_config"] = dict(out.get("text_config") or {})
            t.pop("torch_dtype", None)
            t["dtype"] = dtype
        return out


class Qwen3VL(_Qwen3VLBase):
    name = "qwen3-vl"
    model_types = ("qwen3_vl", "qwen3_vl_text")
    architectures = ("Qwen3VLForConditionalGeneration",)
    multimodal_type = "qwen3_vl"
    text_only = {"model_type": "qwen3", "architectures": "Qwen3ForCausalLM", "attention_bias": False}
    reference = "converters.verify.reference.qwen3_vl:Qwen3VLForward"
    test_models = {"qwen3-vl": ("qwen3-vl-2b", {**_TINY_TEXT, "intermediate_size": 96})}
    models = {
        "qwen3-vl-2b": _published(2048, 6144, 28, 16, 8, True, _vision("qwen3_vl", 24, 1024, 4096, 2048, [5, 11, 17])),
        "qwen3-vl-4b": _published(2560, 9728, 36, 32, 8, True, _vision("qwen3_vl", 24, 1024, 4096, 2560, [5, 11, 17])),
    }

    @classmethod
    def mlp_rules(cls, d: Dims, p: str) -> list[Rule]:
        return common.gated_mlp(d, prefix=p)


class Qwen3VLMoe(_Qwen3VLBase):
    name = "qwen3-vl-moe"
    model_types = ("qwen3_vl_moe", "qwen3_vl_moe_text")
    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    multimodal_type = "qwen3_vl_moe"
    text_only = {"model_type": "qwen3_moe", "architectures": "Qwen3MoeForCausalLM", "attention_bias": False}
    reference = "converters.verify.reference.qwen3_vl:Qwen3VLMoeForward"
    test_models = {
        "qwen3-vl-moe": (
            "qwen3-vl-30b-a3b",
            {
                **_TINY_TEXT,
                "intermediate_size": 96,
                "moe_intermediate_size": 48,
                "num_experts": 4,
                "num_experts_per_tok": 2,
            },
        )
    }
    models = {
        "qwen3-vl-30b-a3b": _published(
            2048, 6144, 48, 32, 4, False, _vision("qwen3_vl_moe", 27, 1152, 4304, 2048, [8, 16, 24]), _MOE_30B
        ),
    }

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        d = super().dims(cfg)
        t = cls.text_config(cfg)
        Qwen3Moe.dims(t)  # the qwen3_moe block's refusals: dense layers, shared experts, too few experts
        d.extra["experts_transposed"] = saved_by_transformers_5(cfg)
        return moe_common.moe_dims(d, t, cls.name, experts_key="num_experts", mlp_key="moe_intermediate_size")

    @classmethod
    def mlp_rules(cls, d: Dims, p: str) -> list[Rule]:
        E, F, X = d.emb, d.mlp, moe_common.experts(d)
        rules = moe_common.router(d, p + "mlp.gate", "moe_block/gate")
        if not d.extra["fused_experts"]:  # the text-only export (Qwen3MoeForCausalLM): one tensor per expert
            names = ("gate_proj", "up_proj", "down_proj")
            return rules + moe_common.per_expert_glu(d, p + "mlp.experts.{e}", "moe_block", names)
        if d.extra["experts_transposed"]:  # transformers >= 5: [2F, emb] per expert (gate rows, then up rows), [emb, F]
            return rules + [
                Rule(
                    p + "mlp.experts.gate_up_proj",
                    ("moe_block/wi_0", "moe_block/wi_1"),
                    hf_shape=(2 * F, E),
                    mt_shape=(E, F),
                    chain=(Kernel((E, F)),),
                    experts=X,
                    split=Chunks(2, axis=0),
                ),
                Rule(
                    p + "mlp.experts.down_proj",
                    "moe_block/wo",
                    hf_shape=(E, F),
                    mt_shape=(F, E),
                    chain=(Kernel((F, E)),),
                    experts=X,
                ),
            ]
        return rules + [
            Rule(
                p + "mlp.experts.gate_up_proj",
                ("moe_block/wi_0", "moe_block/wi_1"),
                hf_shape=(E, 2 * F),
                mt_shape=(E, F),
                experts=X,
                split=Chunks(2, axis=-1),  # gate columns, then up columns
            ),
            Rule(p + "mlp.experts.down_proj", "moe_block/wo", hf_shape=(F, E), mt_shape=(F, E), experts=X),
        ]
