"""Llama 4 text model (MaxText decoder block `llama4`: `llama4-17b-16e` Scout, `llama4-17b-128e` Maverick).

What MaxText 0.2.5 lays out (models/llama4.py `Llama4DecoderLayer`, `Llama4ScannableBlock`; layers/moe.py
`RoutedAndSharedMoE`), per layer under `decoder/layers_<i>/` (unscanned) or, scanned, as 4 stacks
`decoder/layers/layers_<p>/` (`inhomogeneous_layer_cycle_interval: 4`; entry j = layer 4j + p, layer axis 1):
  * `pre_self_attention_layer_norm/scale`, `post_self_attention_layer_norm/scale`;
  * `self_attention/{query,key,value,out}/kernel`: moved only. HF's Llama 4 applies RoPE to interleaved pairs
    (2i, 2i+1) (complex form) and MaxText picks `LLaMARotaryEmbedding` (the same pairs) for `rope_type: llama3.1`,
    so no permutation; the block passes `query_pre_attn_scalar = head_dim**-0.5` at run time, so no baked scale.
    The qk norm (`use_qk_norm`, L2 norm after RoPE on RoPE layers) has no weights;
  * dense layers (layer l with (l + 1) % interleave_moe_layer_step != 0): `mlp/wi_0|wi_1|wo/kernel` from
    `feed_forward.gate_proj|up_proj|down_proj` (width `intermediate_size_mlp`);
  * MoE layers: `Llama4MoEBlock_0/MoeBlock_0/gate/kernel` (router, transposed), `.../MoeBlock_0/wi_0|wi_1`
    `[X, emb, F]` = the halves of HF's fused `experts.gate_up_proj` `[X, emb, 2F]` (gate first; no transpose),
    `.../MoeBlock_0/wo` = `experts.down_proj` `[X, F, emb]` as is, `Llama4MoEBlock_0/shared_experts/...` from
    `feed_forward.shared_expert.*`.
Every transform only moves elements: round trips are bit-exact.

What MaxText computes beyond the layout (see converters/verify/reference/llama4.py): RoPE layers attend within
chunks of `chunk_attn_window_size`; every `nope_layer_interval`-th layer (4) has no RoPE, attends globally and
scales its query by MaxText's fixed temperature tuning (0.1, floor 8192); routing is top-1 with a sigmoid score
multiplied into the expert's input.

Two HF layouts of the same language model, converted to the same MaxText arrays:
  * the text model, `Llama4ForCausalLM` (model_type `llama4_text`): `model.*`, `lm_head.weight`;
  * the multimodal checkpoint the meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}(-Instruct) repos publish,
    `Llama4ForConditionalGeneration` (model_type `llama4`, the text model's config in `text_config`): the language
    model under `language_model.` (`language_model.model.*`, `language_model.lm_head.weight`; transformers 4.51,
    which wrote the repos, and transformers 5 name them alike), read by the text model's rules under that prefix, as
    Qwen3.5's (converters/families/qwen3_5.py). Its vision tower `vision_model.*` and projector
    `multi_modal_projector.*` convert to MaxText's `vision_encoder/...` (use_multimodal=true), never scanned:
    converters/families/llama4_vision.py.
`models` holds the published multimodal configs (their `text_config`s rebuilt from MaxText's ymls, `LLAMA4_SCOUT` /
`LLAMA4_MAVERICK` as `Llama4ForCausalLM` configs).
Export (MaxText -> HF) writes the layout of the config it is given: a checkpoint converted from a text model (its
sidecar config `llama4_text`, or `--hf-config` a Llama4ForCausalLM config) stays a `Llama4ForCausalLM` folder; one
converted from a multimodal folder, or exported with `--model llama4-17b-*` (the published configs), is written as
the multimodal checkpoint (`Llama4ForConditionalGeneration`, `language_model.*` and the tower). A checkpoint without
the tower (MaxText use_multimodal=false) exports as the text model, `Llama4ForCausalLM` (with a warning), even given
a multimodal config, as Gemma 4's and Qwen3-VL's.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

from converters.core.mapping import Dims, LayerGroup, Rule, require
from converters.core.transforms import Chunks, Kernel
from converters.errors import UnsupportedModelError
from converters.families import common, llama4_vision, moe_common
from converters.families.common import L

CYCLE = 4  # MaxText's inhomogeneous_layer_cycle_interval for both models: the scanned block is 4 layers
NOPE_INTERVAL = 4  # MaxText's nope_layer_interval for both models
MOE = "Llama4MoEBlock_0"
FF = L + "feed_forward."
TEXT = "language_model."  # the language model's prefix in a multimodal (Llama4ForConditionalGeneration) checkpoint


def _published(experts: int, step: int, max_pos: int, rope_scaling, qk_norm: bool) -> dict:
    """The published text_config of meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}(-Instruct), as a
    Llama4ForCausalLM config (no_rope_layers and moe_layers as transformers derives them)."""
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "attention_dropout": 0.0,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192,
        "for_llm_compressor": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "interleave_moe_layer_step": step,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": max_pos,
        "moe_layers": list(range(step - 1, 48, step)),
        "no_rope_layers": [int((i + 1) % NOPE_INTERVAL != 0) for i in range(48)],
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "output_router_logits": False,
        "pad_token_id": 200018,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": 500000.0,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_qk_norm": qk_norm,
        "vocab_size": 202048,
    }


_SCOUT_ROPE = {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
LLAMA4_SCOUT = _published(16, 1, 10485760, _SCOUT_ROPE, True)
LLAMA4_MAVERICK = _published(128, 2, 1048576, None, False)

# the published vision_config (both releases; MaxText's llama4 ymls: hidden_size_for_vit 1408, 34 layers, 16 heads,
# intermediate 5632, image 336 / patch 14, pixel shuffle 0.5, projector 4096)
_VISION = {
    "attention_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1408,
    "image_size": 336,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "model_type": "llama4_vision_model",
    "multi_modal_projector_bias": False,
    "norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 34,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_dropout": 0.0,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "rope_theta": 10000,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "vision_output_dim": 4096,
}


def multimodal(text: dict) -> dict:
    """The published Llama4ForConditionalGeneration config.json around a text model's config."""
    t = {k: v for k, v in text.items() if k != "architectures"}
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "image_token_index": 200092,
        "model_type": "llama4",
        "text_config": t,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0.dev0",
        "vision_config": copy.deepcopy(_VISION),
    }


# Tiny test models: heads * head_dim != hidden, top-1 (the only routing MaxText's llama4 block has), a 32-token
# chunk the long verification prompt crosses many times. 4 layers: RoPE, RoPE, RoPE, NoPE.
_TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 48,
    "intermediate_size_mlp": 96,
    "num_local_experts": 4,
    "attention_chunk_size": 32,
    "moe_layers": None,
    "no_rope_layers": None,
    "pad_token_id": 0,
}
TINY_VISION = llama4_vision.TINY_VISION  # the multimodal test model's tower


def tiny_config(name: str, cfg: dict, dims: dict, *, layers: int, vocab: int, tied: bool | None) -> dict:
    """A tiny Llama 4 config from a published (multimodal) one (converters/tiny_models.py `tiny_config`): the text
    model (`Llama4ForCausalLM`), or for a `-mm` test model the multimodal checkpoint with a tiny vision tower."""
    text = {**cfg["text_config"], "architectures": ["Llama4ForCausalLM"]}
    text.update(dims, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if tied is not None:
        text["tie_word_embeddings"] = tied
    if not name.endswith("-mm"):
        return text
    out = multimodal(text)
    out["vision_config"].update(TINY_VISION)
    for i, k in enumerate(("boi_token_index", "eoi_token_index", "image_token_index")):
        out[k] = vocab - 3 + i
    out["tie_word_embeddings"] = text["tie_word_embeddings"]
    return out


def moe_layer(l: int, step: int) -> bool:
    """MaxText models/llama4.py determine_is_moe_layer."""
    return (l + 1) % step == 0


class Llama4(common.DecoderOnly):
    name = "llama4"
    model_types = ("llama4_text", "llama4")
    architectures = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    reference = "converters.verify.reference.llama4:Llama4Forward"
    test_models = {
        # Scout's path: every layer MoE, qk L2 norm, llama3 rope scaling
        "llama4": ("llama4-17b-16e", dict(_TINY)),
        # Maverick's path: dense and MoE layers interleaved, no qk norm, no rope scaling
        "llama4-interleaved": ("llama4-17b-128e", dict(_TINY)),
        # the published multimodal layout (Llama4ForConditionalGeneration) around Maverick's path, a tiny tower
        # (llama4_vision.TINY_VISION)
        "llama4-mm": ("llama4-17b-128e", dict(_TINY)),
    }
    models = {"llama4-17b-16e": multimodal(LLAMA4_SCOUT), "llama4-17b-128e": multimodal(LLAMA4_MAVERICK)}

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        if cfg.get("model_type") == "llama4":  # Llama4ForConditionalGeneration: the language model in text_config
            t = cfg.get("text_config")
            if not isinstance(t, dict) or t.get("model_type", "llama4_text") != "llama4_text":
                raise UnsupportedModelError(
                    f"{cls.name}: a multimodal (model_type llama4) config.json needs the text model's config in "
                    "text_config (model_type llama4_text)"
                )
            if bool(cfg.get("tie_word_embeddings", False)) != bool(t.get("tie_word_embeddings", False)):
                raise UnsupportedModelError(
                    f"{cls.name}: tie_word_embeddings differs between config.json and its text_config"
                )
            d = cls._text_dims(t)
            d.extra["multimodal"] = True
            # the tower (transformers' Llama4VisionConfig defaults when vision_config is absent)
            d.extra["vision"] = llama4_vision.vision_dims(cfg.get("vision_config"), d.emb)
            return d
        if cfg.get("vision_config") is not None or cfg.get("text_config") is not None:
            raise UnsupportedModelError(
                f"{cls.name}: model_type {cfg.get('model_type')!r} with a vision_config / text_config: a multimodal "
                "Llama 4 checkpoint is model_type llama4 (Llama4ForConditionalGeneration)"
            )
        return cls._text_dims(cfg)

    @classmethod
    def _text_dims(cls, cfg: dict) -> Dims:
        d = moe_common.moe_dims(
            super().dims(cfg), cfg, cls.name, experts_key="num_local_experts", mlp_key="intermediate_size"
        )
        step = int(cfg.get("interleave_moe_layer_step") or 1)
        want = list(range(step - 1, d.layers, step))
        moe = cfg.get("moe_layers")
        if moe is not None and list(moe) != want:
            raise UnsupportedModelError(
                f"llama4: moe_layers {list(moe)} is not every {step}-th layer; MaxText places MoE layers by "
                "interleave_moe_layer_step only"
            )
        if CYCLE % step:
            raise UnsupportedModelError(
                f"llama4: interleave_moe_layer_step={step}; MaxText's 4-layer block needs a divisor of 4"
            )
        if d.extra["top_k"] != 1:
            raise UnsupportedModelError(
                f"llama4: num_experts_per_tok={d.extra['top_k']}; MaxText's llama4 block scales the expert input by "
                "the router score, which it only expresses for top-1"
            )
        d.extra["step"] = step
        d.extra["dense_mlp"] = int(require(cfg, "intermediate_size_mlp", cls.name)) if step > 1 else None
        d.extra["multimodal"] = False
        d.extra["vision"] = None
        return d

    @classmethod
    def _text(cls, d: Dims, rules) -> list[Rule]:
        """The text model's rules, under the multimodal checkpoint's `language_model.` prefix when it is one."""
        if not d.extra["multimodal"]:
            return list(rules)
        return [dataclasses.replace(r, hf=TEXT + r.hf) for r in rules]

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        v = d.extra["vision"]
        return cls._text(d, super().global_rules(d)) + (llama4_vision.global_rules(v) if v else [])

    @classmethod
    def kind_rules(cls, d: Dims, moe: bool) -> tuple[Rule, ...]:
        E = d.emb
        rules = [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale", E),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale", E),
            *common.attention(d, rope_interleave=False, scale_query=False),
        ]
        if not moe:
            F = d.extra["dense_mlp"]
            return tuple(cls._text(d, (*rules, *_glu(E, F, FF, "mlp"))))
        F, X = d.mlp, moe_common.experts(d)
        x = f"{MOE}/MoeBlock_0"
        return tuple(
            cls._text(
                d,
                (
                    *rules,
                    *moe_common.router(d, FF + "router", f"{x}/gate"),
                    Rule(
                        FF + "experts.gate_up_proj",
                        (f"{x}/wi_0", f"{x}/wi_1"),
                        hf_shape=(E, 2 * F),
                        mt_shape=(E, F),
                        experts=X,
                        split=Chunks(2, axis=1),  # gate columns first, then up (transformers' gate_up.chunk(2, -1))
                    ),
                    Rule(FF + "experts.down_proj", f"{x}/wo", hf_shape=(F, E), mt_shape=(F, E), experts=X),
                    *_glu(E, F, FF + "shared_expert.", f"{MOE}/shared_experts"),
                ),
            )
        )

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        return list(cls.kind_rules(d, moe_layer(0, d.extra["step"])))

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        n, step = d.layers, d.extra["step"]
        v = d.extra["vision"]
        tower = llama4_vision.layer_groups(v) if v else []  # never scanned
        if not scan:
            return [
                LayerGroup(cls.kind_rules(d, moe), ls, None, tuple(f"decoder/layers_{i}" for i in ls))
                for moe in (False, True)
                if (ls := tuple(i for i in range(n) if moe_layer(i, step) == moe))
            ] + tower
        if n % CYCLE:
            raise UnsupportedModelError(
                f"llama4: a scanned checkpoint needs a multiple of {CYCLE} layers (MaxText scans 4-layer blocks), "
                f"config has {n}"
            )
        return [
            LayerGroup(
                cls.kind_rules(d, moe_layer(p, step)), tuple(range(p, n, CYCLE)), f"decoder/layers/layers_{p}", ()
            )
            for p in range(CYCLE)
        ] + tower

    @classmethod
    def config_for_checkpoint(cls, cfg: dict, stored: set[str]) -> dict:
        """A checkpoint without the tower (MaxText use_multimodal=false) exports as the text model,
        Llama4ForCausalLM, even when the config is the multimodal one."""
        if cfg.get("model_type") == "llama4" and not any(k.startswith("vision_encoder/") for k in stored):
            warnings.warn(
                f"{cls.name}: the checkpoint has no vision tower (MaxText use_multimodal=false): writing the text "
                "model only, Llama4ForCausalLM (model_type llama4_text)",
                stacklevel=3,
            )
            return text_only(cfg)
        return cfg

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        out = super().export_config(cfg, dtype)
        if isinstance(out.get("text_config"), dict):  # the multimodal layout: its text model's dtype too
            t = out["text_config"] = dict(out["text_config"])
            t.pop("torch_dtype", None)
            t["dtype"] = dtype
        return out


def text_only(cfg: dict) -> dict:
    """The Llama4ForCausalLM (llama4_text) config of a multimodal config's language model."""
    t = {k: v for k, v in (cfg.get("text_config") or {}).items() if k not in ("architectures", "torch_dtype", "dtype")}
    t.update(model_type="llama4_text", architectures=["Llama4ForCausalLM"])
    t["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    for k in ("dtype", "torch_dtype"):
        if cfg.get(k) is not None:
            t[k] = cfg[k]
    return t


def _glu(E: int, F: int, hf: str, mt: str) -> list[Rule]:
    """gate/up/down Linear weights under `hf` <-> MaxText `wi_0`/`wi_1`/`wo` kernels under `mt`."""
    return [
        Rule(hf + "gate_proj.weight", f"{mt}/wi_0/kernel", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),)),
        Rule(hf + "up_proj.weight", f"{mt}/wi_1/kernel", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),)),
        Rule(hf + "down_proj.weight", f"{mt}/wo/kernel", hf_shape=(E, F), mt_shape=(F, E), chain=(Kernel((F, E)),)),
    ]
