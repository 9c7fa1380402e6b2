"""Qwen3.5 MoE's language model (MaxText `qwen3.5-35b-a3b`, `qwen3.5-397b-a17b`: decoder block `qwen3_5`).

What MaxText 0.2.5 lays out and computes (configs/models/qwen3.5-*.yml, models/qwen3_5.py, the layers of
models/qwen3.py): Qwen3-Next's layers unchanged (`Qwen3_5GatedDeltaNet`, `Qwen3_5FullAttention`,
`Qwen3_5SparseMoEBlock` subclass the Qwen3-Next ones without changes), so the rules and the verify reference are
Qwen3-Next's (converters/families/qwen3_next.py, converters/verify/reference/qwen3_next.py), with these differences:
  * scanned: `Qwen3_5ScannableBlock` holds the cycle's four layers as attributes `layer_0..layer_3` and the decoder
    scans it over the blocks, so every cycle position is its own stack, `decoder/layers/layer_<p>` (HF layers p, p+4,
    ..., the layer axis at 1) -- the layout ckptflow's Qwen3-Next family reads as its legacy one. Unscanned
    `decoder/layers_<i>`;
  * HF (transformers `Qwen3_5MoeForConditionalGeneration`, model type `qwen3_5_moe`) stores the gated delta net's input
    projections unfused, `in_proj_qkv` ([q | k | v], heads flattened) + `in_proj_z`, `in_proj_b` + `in_proj_a`;
    MaxText fuses them per key head as Qwen3-Next's HF does ([q k v z] and [b a] per key head, MaxText
    param_mapping.py `concat_qkvz_and_transpose` / `concat_ba_and_transpose`). They are read as Qwen3-Next's fused
    tensors (`hf_fusions`, a pure permutation of rows) and written back unfused: bit-exact both ways;
  * the published repos fuse the routed experts per layer (MaxText's hook reads them so): `mlp.experts.gate_up_proj`
    `[X, 2F, emb]` (gate rows, then up rows -> `wi_0`, `wi_1`), `mlp.experts.down_proj` `[X, emb, F]` (-> `wo`); they
    are read as transformers' per-expert tensors (`expert_slices`), which is what transformers >= 5 saves and what
    an export writes (transformers loads both);
  * the language model under `model.language_model.*`, `lm_head.weight` at the top, the text config in `text_config`,
    tying the top-level flag;
  * RoPE: `use_mrope` with `mrope_section [11, 11, 10]` over the 64 rotary dims; a text token's three positions are
    its one position, so on text it is the partial half-split RoPE Qwen3-Next's reference computes.
The `-fp8` repos (Qwen/Qwen3.5-*-FP8: float8 e4m3 projections with a `weight_scale_inv` per 128x128 block, the experts
per expert, as MaxText's param_mapping.py reads them) are decoded while read, as DeepSeek-V3's
(converters/io/quantized.py `Fp8Folder`, before the fusions above), into the bf16 model's tree; MaxText's own
`qwen3.5-*-fp8` model names, which hold float8 kernels with `kernel_scale` arrays, are not written.
The vision tower `model.visual.*` (transformers `Qwen3_5MoeVisionModel`) goes to MaxText's
`vision_encoder/Qwen3_5MoeVisionEncoder_0` + `Qwen3_5MoeVisionProjector_0` (models/qwen3_5_vision.py: Qwen3-Omni's
tower classes under new names, as Qwen3-VL's): Qwen3-VL's tower rules (converters/families/qwen3_vl_vision.py) under
these names, without deepstack mergers (`deepstack_visual_indexes_for_vit: []` in MaxText's ymls; transformers has
none). Never scanned (`blocks_<i>` in both layouts of the text model), nothing scaled: bit-exact both ways. A MaxText
checkpoint without the tower (use_multimodal=false) exports the multimodal config without it, with a warning
(transformers initialises model.visual.* randomly; text logits are unaffected).
Not converted: the multi-token-prediction module `mtp.*` (skipped, as by transformers and MaxText).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np

from converters.core.mapping import Dims, LayerGroup, Rule
from converters.core.transforms import Fusion, Slices
from converters.errors import UnsupportedModelError
from converters.families import moe_common, qwen3_vl_vision
from converters.families.qwen3_next import Qwen3Next

TEXT = "model.language_model."
ENCODER = "vision_encoder/Qwen3_5MoeVisionEncoder_0"  # MaxText layers/encoders.py, vision_encoder_block qwen3_5
PROJECTOR = "vision_encoder/Qwen3_5MoeVisionProjector_0"
NO_TOWER = "_ckptflow_checkpoint_without_tower"  # config_for_checkpoint's mark: a MaxText checkpoint without the tower
_MROPE = {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25}


def _vision(out: int) -> dict:
    return {
        "deepstack_visual_indexes": [],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4304,
        "model_type": "qwen3_5_moe",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": out,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _published(hidden, layers, heads, value_heads, experts, top_k, mlp) -> dict:
    """Qwen/Qwen3.5-*-A*B config.json: the dimensions MaxText's configs/models/qwen3.5-*.yml give, in the layout of
    transformers' `Qwen3_5MoeConfig` (text_config + vision_config, rope_parameters)."""
    kinds = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
        "eos_token_id": 248044,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "layer_types": kinds,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": value_heads,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": mlp,
        "mtp_num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {**_MROPE, "rope_theta": 10000000, "rope_type": "default"},
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": mlp,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 248320,
    }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "image_token_id": 248056,
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "5.2.0",
        "video_token_id": 248057,
        "vision_config": _vision(hidden),
        "vision_end_token_id": 248054,
        "vision_start_token_id": 248053,
    }


# Tiny test model: Qwen3-Next's tiny dims (2 key / 4 value GDN heads, key dim 16 != value dim 24, full attention
# 4 x 32 with 8 rotary dims = mrope_section [2, 1, 1]) and a one-block vision tower (head_dim 16, a 4x4 position grid)
TINY_TEXT = {
    **moe_common.TINY,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 24,
}
TINY_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "num_position_embeddings": 16}


def tiny_multimodal(cfg: dict, dims: dict, *, layers: int, vocab: int, tied: bool | None) -> dict:
    """A tiny Qwen3.5-MoE config from a published one (converters/tiny_models.py `tiny_config`)."""
    cfg = copy.deepcopy(cfg)
    t = cfg["text_config"]
    t.update(dims, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    t["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    t["rope_parameters"] = {**t["rope_parameters"], "mrope_section": [2, 1, 1]}
    t.pop("mtp_num_hidden_layers", None)
    cfg["vision_config"].update(TINY_VISION, out_hidden_size=t["hidden_size"])
    for i, k in enumerate(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")):
        cfg[k] = vocab - 4 + i
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    return cfg


def _per_key_head(d: Dims) -> tuple[int, int, int, int]:
    x = d.extra
    return x["key_heads"], x["key_dim"], x["value_heads"] // x["key_heads"] * x["value_dim"], x["value_heads"]


def qkvz_fusion(d: Dims, p: str) -> Fusion:
    """`in_proj_qkv` `[2K + V, emb]` + `in_proj_z` `[V, emb]` <-> Qwen3-Next's `in_proj_qkvz`, rows grouped per key
    head as [q_h k_h v_h z_h] (v_h, z_h: that key head's value heads)."""
    hk, dk, dv, _ = _per_key_head(d)
    E, key = d.emb, hk * dk

    def join(xs):
        qkv, z = xs
        q, k, v = qkv[:key], qkv[key : 2 * key], qkv[2 * key :]
        parts = [q.reshape(hk, dk, E), k.reshape(hk, dk, E), v.reshape(hk, dv, E), z.reshape(hk, dv, E)]
        return np.concatenate(parts, axis=1).reshape(-1, E)

    def take(x, k):
        g = x.reshape(hk, 2 * dk + 2 * dv, E)
        if k == 1:
            return np.ascontiguousarray(g[:, 2 * dk + dv :].reshape(-1, E))
        q, kk, v = g[:, :dk], g[:, dk : 2 * dk], g[:, 2 * dk : 2 * dk + dv]
        return np.concatenate([q.reshape(-1, E), kk.reshape(-1, E), v.reshape(-1, E)], axis=0)

    a = p + "linear_attn."
    parts = ((a + "in_proj_qkv.weight", (2 * key + hk * dv, E)), (a + "in_proj_z.weight", (hk * dv, E)))
    return Fusion(a + "in_proj_qkvz.weight", parts, join, take)


def ba_fusion(d: Dims, p: str) -> Fusion:
    """`in_proj_b` `[Hv, emb]` + `in_proj_a` `[Hv, emb]` <-> Qwen3-Next's `in_proj_ba`, [b_h a_h] per key head."""
    hk, _, _, hv = _per_key_head(d)
    E, r = d.emb, hv // hk

    def join(xs):
        b, a = xs
        return np.concatenate([b.reshape(hk, r, E), a.reshape(hk, r, E)], axis=1).reshape(-1, E)

    def take(x, k):
        return np.ascontiguousarray(x.reshape(hk, 2 * r, E)[:, k * r : (k + 1) * r].reshape(-1, E))

    a = p + "linear_attn."
    return Fusion(
        a + "in_proj_ba.weight", ((a + "in_proj_b.weight", (hv, E)), (a + "in_proj_a.weight", (hv, E))), join, take
    )


def expert_slices(d: Dims, p: str) -> list[Slices]:
    """The published fused experts, `mlp.experts.gate_up_proj` `[X, 2F, emb]` (gate rows, then up rows) and
    `mlp.experts.down_proj` `[X, emb, F]`, read as transformers' per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`
    (what transformers >= 5 saves, and what the rules name)."""
    F, X, m = d.mlp, moe_common.experts(d), p + "mlp.experts."
    return [
        Slices(
            m + "gate_up_proj",
            tuple(
                (f"{m}{e}.{name}.weight", (e, slice(k * F, (k + 1) * F)))
                for e in range(X)
                for k, name in enumerate(("gate_proj", "up_proj"))
            ),
        ),
        Slices(m + "down_proj", tuple((f"{m}{e}.down_proj.weight", (e,)) for e in range(X))),
    ]


class Qwen3_5Moe(Qwen3Next):
    name = "qwen3.5-moe"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    architectures = ("Qwen3_5MoeForConditionalGeneration",)
    reference = "converters.verify.reference.qwen3_5:Qwen3_5MoeForward"
    test_models = {"qwen3.5-moe": ("qwen3.5-35b-a3b", TINY_TEXT)}
    models = {
        "qwen3.5-35b-a3b": _published(2048, 40, 16, 32, 256, 8, 512),
        "qwen3.5-397b-a17b": _published(4096, 60, 32, 64, 512, 10, 1024),
    }
    ignored_hf = (r".*rotary_emb\.inv_freq", r"mtp\..*")  # the multi-token-prediction module

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        if cfg.get("model_type") != "qwen3_5_moe":
            raise UnsupportedModelError(
                f"{cls.name}: model_type {cfg.get('model_type')!r}: convert the Qwen3_5MoeForConditionalGeneration "
                "checkpoint (model_type qwen3_5_moe, the published layout)"
            )
        qc = cfg.get("quantization_config")
        if qc and (not isinstance(qc, dict) or qc.get("quant_method") != "fp8"):
            raise UnsupportedModelError(
                f"{cls.name}: quantization_config {qc!r}: only the FP8 block-scaled (-fp8) repos are read"
            )
        t = dict(cfg.get("text_config") or {})
        rp = t.get("rope_parameters") or {}
        if rp.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{cls.name}: rope_type {rp.get('rope_type')!r} (MaxText: default mrope)")
        t.setdefault("intermediate_size", t.get("moe_intermediate_size"))
        d = super().dims(t)
        d.tied = bool(cfg.get("tie_word_embeddings", False))
        vision = cfg.get("vision_config") if not cfg.get(NO_TOWER) else None
        d.extra["vision"] = vision and qwen3_vl_vision.vision_dims(
            vision, d.emb, family=cls.name, encoder=ENCODER, projector=PROJECTOR, deepstack=False
        )
        return d

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        return super().ignored(d) + ([] if d.extra["vision"] else [r"model\.visual\..*"])

    @classmethod
    def config_for_checkpoint(cls, cfg: dict, stored: set[str]) -> dict:
        """A checkpoint without the tower (MaxText use_multimodal=false) exports the language model only (and verify
        runs no image prompt on it): the config marked `NO_TOWER`, with a warning if it describes a tower."""
        if any(k.startswith("vision_encoder/") for k in stored):
            return cfg
        if cfg.get("vision_config"):
            warnings.warn(
                f"{cls.name}: the checkpoint has no vision tower (MaxText use_multimodal=false): an export holds the "
                "language model only (transformers initialises model.visual.* randomly; text logits are unaffected)",
                stacklevel=3,
            )
        return {**cfg, NO_TOWER: True}

    @classmethod
    def _text(cls, rules: list[Rule]) -> list[Rule]:
        """Qwen3-Next's rules under the multimodal checkpoint's `model.language_model.` prefix."""
        return [dataclasses.replace(r, hf=TEXT + r.hf.removeprefix("model.")) for r in rules]

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        rules = [r if r.hf == "lm_head.weight" else cls._text([r])[0] for r in super().global_rules(d)]
        return rules + (qwen3_vl_vision.vision_rules(d.extra["vision"]) if d.extra["vision"] else [])

    @classmethod
    def kind_rules(cls, d: Dims, kind: str) -> tuple[Rule, ...]:
        return tuple(cls._text(list(super().kind_rules(d, kind))))

    @classmethod
    def hf_fusions(cls, d: Dims) -> list[Fusion | Slices]:
        out: list = []
        for i, kind in enumerate(d.extra["kinds"]):
            p = f"{TEXT}layers.{i}."
            if kind == "linear_attention":
                out += [qkvz_fusion(d, p), ba_fusion(d, p)]
            out += expert_slices(d, p)
        return out

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        # the tower's blocks: never scanned (MaxText sets them one by one, `blocks_<i>`)
        tower = qwen3_vl_vision.vision_groups(d.extra["vision"]) if d.extra["vision"] else []
        return cls._text_groups(d, scan) + tower

    @classmethod
    def _text_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        if not scan:
            return super().layer_groups(d, scan)
        n, c, kinds = d.layers, d.extra["interval"], d.extra["kinds"]
        if n % c:
            raise UnsupportedModelError(
                f"a scanned {cls.name} checkpoint needs a multiple of {c} layers, config has {n}"
            )
        # models/qwen3_5.py Qwen3_5ScannableBlock: the cycle's layers as `layer_<p>`, the block scanned over cycles
        return [
            LayerGroup(cls.kind_rules(d, kinds[p]), tuple(range(p, n, c)), f"decoder/layers/layer_{p}", ())
            for p in range(c)
        ]

    @classmethod
    def legacy_layouts(cls, d: Dims) -> dict[str, list[LayerGroup]]:
        return {}

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        out = super().export_config(cfg, dtype)
        out.pop(NO_TOWER, None)
        t = out["text_config"] = dict(out.get("text_config") or {})
        t.pop("torch_dtype", None)
        t["dtype"] = dtype
        return out
