"""Gemma 4's vision tower and projector (multimodal `gemma4` checkpoints, Gemma4ForConditionalGeneration), as MaxText
0.2.5 lays them out under `vision_encoder/` (models/gemma4_vision.py, layers/encoders.py; never scanned), and the
text model's names in such a checkpoint (`model.language_model.*` instead of `model.*`).

What MaxText computes (`Gemma4VisionEncoderLayer`, `Gemma4VisionProjector`):

* `vision_entry`: the image cut into p x p patches flattened (row, column, channel) -- the order of HF's
  `patch_embedder.input_proj` inputs, so its kernel is only transposed -- scaled 2 (x - 0.5), projected without bias,
  plus a factorized position embedding: `pos_emb_param[x, 0] + pos_emb_param[y, 1]`, stored `[positions, 2, hidden]`
  where HF's `position_embedding_table` is `[2, positions, hidden]` (axes 0 and 1 swapped).
* `layer_<i>` (HF `encoder.layers.<i>`): RMSNorm -> attention -> RMSNorm, residual; RMSNorm -> gated gelu MLP ->
  RMSNorm, residual. Attention: q/k/v without bias (kernels transposed and reshaped `[hidden, heads, head_dim]`),
  q/k RMSNorms with a scale, a v RMSNorm without one (`v_norm_with_scale: false`), 2-D RoPE (first half of each head
  rotated by the patch's x, second half by its y, half-split within each, theta `rope_theta_for_vit`), no query
  scaling, no mask (every patch sees every patch). All norms multiply by the stored scale, as HF's (Gemma 4 folded
  the `1 + w` into its weights): stored as is.
* `vision_exit`: average pooling of k x k patches (k^2 = patches / `vision_output_length`), times sqrt(hidden); then
  `(x - std_bias) * std_scale` (HF `standardize`; its buffers `std_bias` / `std_scale`).
* `Gemma4VisionProjector_0`: an RMSNorm without scale, then `projection` `[hidden, text hidden]` (HF
  `embed_vision.embedding_projection.weight` transposed).

Every tower tensor is moved as is (transposes and reshapes only): round trips are bit-exact.

Refused (MaxText has no place for them): clipped linears (`use_clipped_linears`, e2b/e4b), a tower without
standardization (`standardize: false`), grouped kv heads or a head_dim other than hidden / heads, attention biases,
an audio tower (e2b/e4b; MaxText 0.2.5's param mapping has no entry for `model.audio_tower.*`, its to_maxtext never
reads them).
"""

from __future__ import annotations

import dataclasses
import warnings

from converters.core.mapping import Dims, LayerGroup, Rule
from converters.core.transforms import Kernel, Permute
from converters.errors import MappingError, UnsupportedModelError
from converters.families import common

ENCODER = "vision_encoder/Gemma4VisionEncoderLayer_0"
PROJECTOR = "vision_encoder/Gemma4VisionProjector_0"
TEXT_PREFIX = "model.language_model."  # the text model's tensors in a multimodal checkpoint
TOWER = "model.vision_tower."

# transformers' Gemma4VisionConfig defaults for keys a config may leave out
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "pooling_kernel_size": 3,
    "patch_size": 16,
    "position_embedding_size": 10 * 1024,
    "use_clipped_linears": False,
    "standardize": False,
}


def _vget(v: dict, key: str):
    return v[key] if key in v else VISION_DEFAULTS.get(key)


def is_multimodal(cfg: dict) -> bool:
    return cfg.get("model_type") == "gemma4"


def split_config(cfg: dict) -> tuple[dict, dict]:
    """(the text model's config, what the multimodal layout adds to Dims.extra: `prefix`, `vision`) of a gemma4 or
    gemma4_text config."""
    if not is_multimodal(cfg):
        return cfg, {"prefix": "model.", "vision": None}
    if cfg.get("audio_config"):
        raise UnsupportedModelError(
            "gemma4: an audio tower (e2b/e4b) is not supported: MaxText 0.2.5 has no audio encoder for gemma4"
        )
    text = dict(cfg.get("text_config") or {})
    if cfg.get("tie_word_embeddings") is False:
        text.setdefault("tie_word_embeddings", False)
    return text, {"prefix": TEXT_PREFIX, "vision": vision_dims(cfg.get("vision_config"))}


def vision_dims(v: dict | None) -> dict | None:
    if not v:
        return None
    g = lambda k: _vget(v, k)  # noqa: E731
    H, N = int(g("hidden_size")), int(g("num_attention_heads"))
    refuse = [
        (g("use_clipped_linears"), "clipped linears (use_clipped_linears: MaxText's tower does not clamp)"),
        (not g("standardize"), "standardize=false (MaxText's tower always applies std_bias / std_scale)"),
        (int(g("num_key_value_heads")) != N, "grouped kv heads (MaxText's tower has as many kv heads as heads)"),
        (int(g("head_dim")) * N != H, "head_dim != hidden_size / heads (MaxText's tower derives it so)"),
        (g("attention_bias"), "attention biases (MaxText's tower has none)"),
    ]
    for bad, what in refuse:
        if bad:
            raise MappingError(f"gemma4: vision_config with {what}")
    return {
        "hidden": H,
        "heads": N,
        "head_dim": H // N,
        "mlp": int(g("intermediate_size")),
        "layers": int(g("num_hidden_layers")),
        "patch": int(g("patch_size")),
        "positions": int(g("position_embedding_size")),
    }


def text_names(d: Dims, rules) -> list[Rule]:
    """The text rules named as the checkpoint names them (`model.language_model.*` in a multimodal one)."""
    p = d.extra.get("prefix", "model.")
    if p == "model.":
        return list(rules)
    return [dataclasses.replace(r, hf=p + r.hf[len("model.") :]) if r.hf.startswith("model.") else r for r in rules]


def global_rules(d: Dims) -> list[Rule]:
    """The tower's arrays outside its layers, and the projector."""
    v = d.extra.get("vision")
    if v is None:
        return []
    H, P = v["hidden"], v["patch"]
    return [
        Rule(
            TOWER + "patch_embedder.input_proj.weight",
            f"{ENCODER}/vision_entry/input_projection/kernel",
            hf_shape=(H, 3 * P * P),
            mt_shape=(3 * P * P, H),
            chain=(Permute((1, 0)),),
        ),
        Rule(
            TOWER + "patch_embedder.position_embedding_table",
            f"{ENCODER}/vision_entry/pos_emb_param",
            hf_shape=(2, v["positions"], H),
            mt_shape=(v["positions"], 2, H),
            chain=(Permute((1, 0, 2)),),
        ),
        common.vector(TOWER + "std_bias", f"{ENCODER}/std_bias", H),
        common.vector(TOWER + "std_scale", f"{ENCODER}/std_scale", H),
        Rule(
            "model.embed_vision.embedding_projection.weight",
            f"{PROJECTOR}/projection/kernel",
            hf_shape=(d.emb, H),
            mt_shape=(H, d.emb),
            chain=(Permute((1, 0)),),
        ),
    ]


def layer_rules(v: dict) -> list[Rule]:
    """One encoder layer (HF `model.vision_tower.encoder.layers.{i}.`, MaxText `layer_<i>/`)."""
    H, N, D, F = v["hidden"], v["heads"], v["head_dim"], v["mlp"]
    b = TOWER + "encoder.layers.{i}."
    rules = [
        common.vector(b + "input_layernorm.weight", "pre_attention_norm/scale", H),
        common.vector(b + "post_attention_layernorm.weight", "post_attention_norm/scale", H),
        common.vector(b + "pre_feedforward_layernorm.weight", "pre_ffw_norm/scale", H),
        common.vector(b + "post_feedforward_layernorm.weight", "post_ffw_norm/scale", H),
        common.vector(b + "self_attn.q_norm.weight", "attention/query_norm/scale", D),
        common.vector(b + "self_attn.k_norm.weight", "attention/key_norm/scale", D),
    ]
    for hf, mt in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        rules.append(
            Rule(
                b + f"self_attn.{hf}.linear.weight",
                f"attention/{mt}/kernel",
                hf_shape=(N * D, H),
                mt_shape=(H, N, D),
                chain=(Kernel((H, N, D)),),
            )
        )
    rules.append(
        Rule(
            b + "self_attn.o_proj.linear.weight",
            "attention/out/kernel",
            hf_shape=(H, N * D),
            mt_shape=(N, D, H),
            chain=(Kernel((N, D, H), n_in=2),),
        )
    )
    for hf, mt, shape in (("gate_proj", "wi_0", (H, F)), ("up_proj", "wi_1", (H, F)), ("down_proj", "wo", (F, H))):
        rules.append(
            Rule(
                b + f"mlp.{hf}.linear.weight",
                f"mlp/{mt}/kernel",
                hf_shape=shape[::-1],
                mt_shape=shape,
                chain=(Kernel(shape),),
            )
        )
    return rules


def layer_groups(d: Dims) -> list[LayerGroup]:
    """The tower's layers, never scanned."""
    v = d.extra.get("vision")
    if v is None:
        return []
    n = v["layers"]
    return [LayerGroup(tuple(layer_rules(v)), tuple(range(n)), None, tuple(f"{ENCODER}/layer_{i}" for i in range(n)))]


def text_only(cfg: dict) -> dict:
    """The `gemma4_text` (Gemma4ForCausalLM) config of a multimodal config's language model."""
    t = {k: v for k, v in (cfg.get("text_config") or {}).items() if k != "architectures"}
    t.update(model_type="gemma4_text", architectures=["Gemma4ForCausalLM"], tie_word_embeddings=True)
    for k in ("eos_token_id", "dtype", "torch_dtype"):  # the published eos list [1, 106] sits at the top level
        if cfg.get(k) is not None:
            t[k] = cfg[k]
    return t


def config_for_checkpoint(cfg: dict, stored: set[str]) -> dict:
    """A checkpoint without the tower (MaxText `use_multimodal=false`, its default) exports as the text model,
    Gemma4ForCausalLM, even when the config is the published multimodal one."""
    if is_multimodal(cfg) and not any(k.startswith("vision_encoder/") for k in stored):
        warnings.warn(
            "the checkpoint has no vision tower (MaxText use_multimodal=false): writing the text model only, "
            "Gemma4ForCausalLM (model_type gemma4_text)",
            stacklevel=3,
        )
        return text_only(cfg)
    return cfg


# The published gemma-4-31b / 26b vision_config (MaxText checkpoint_conversion/utils/hf_model_configs.py
# `gemma4_26b_dict`; configs/models/gemma4-31b.yml: 27 layers of 1152, 16 heads, MLP 4304, 16px patches, 10240
# positions, 280 soft tokens from 3 x 3 pooling)
VISION_31B = {
    "model_type": "gemma4_vision",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "default_output_length": 280,
    "dtype": "bfloat16",
    "global_head_dim": 72,
    "head_dim": 72,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "max_position_embeddings": 131072,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "position_embedding_size": 10240,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
    "standardize": True,
    "use_clipped_linears": False,
}
# tiny tower: 4px patches, head_dim 16 (2-D RoPE: 8 channels per axis), 16 positions, 2 x 2 pooling
TINY_VISION = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 16,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "patch_size": 4,
    "position_embedding_size": 16,
    "pooling_kernel_size": 2,
    "default_output_length": 6,
}


def multimodal_config(text: dict, vision: dict | None = None) -> dict:
    """The published Gemma4ForConditionalGeneration config.json around a gemma4_text config (top-level keys from
    MaxText's hf_model_configs.py `gemma4_26b_dict`, the published repos' layout), without an audio tower."""
    t = {k: v for k, v in text.items() if k != "architectures"}
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "audio_config": None,
        "audio_token_id": 258881,
        "boa_token_id": 256000,
        "boi_token_id": 255999,
        "dtype": t.get("dtype", "bfloat16"),
        "eoa_token_id": 258883,
        "eoa_token_index": 258883,
        "eoi_token_id": 258882,
        "eos_token_id": t.get("eos_token_id", [1, 106]),
        "image_token_id": 258880,
        "initializer_range": 0.02,
        "text_config": t,
        "tie_word_embeddings": True,
        "video_token_id": 258884,
        "vision_config": dict(vision or VISION_31B),
        "vision_soft_tokens_per_image": 280,
    }


def tiny_multimodal(text: dict) -> dict:
    """A tiny multimodal test model around the tiny text config `text` (vocabulary of a few hundred: the image and
    boundary tokens get ids inside it)."""
    vocab = int(text["vocab_size"])
    cfg = multimodal_config(text, {**VISION_31B, **TINY_VISION})
    cfg.update(
        image_token_id=vocab - 4,
        boi_token_id=vocab - 3,
        eoi_token_id=vocab - 2,
        video_token_id=vocab - 1,
        audio_token_id=vocab - 5,
        boa_token_id=vocab - 6,
        eoa_token_id=vocab - 7,
        eoa_token_index=vocab - 7,
        vision_soft_tokens_per_image=TINY_VISION["default_output_length"],
    )
    return cfg
