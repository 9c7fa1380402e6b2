"""Qwen3.5 MoE's language model (HF `qwen3_5_moe`) — MaxText decoder block `qwen3_5`.

MaxText's Qwen3.5 layers are Qwen3-Next's unchanged (src/maxtext/models/qwen3_5.py subclasses the Qwen3-Next gated
delta net, gated attention and sparse MoE without overrides), so the computation is `Qwen3NextForward`'s; what differs:
  * the text model's config is `text_config` (tying: the top-level flag transformers reads);
  * scanned, every cycle position is its own stack, `decoder/layers/layer_<p>` (layers p, p + 4, ...): MaxText's
    `Qwen3_5ScannableBlock` -- the layout MaxText loads, so no warning;
  * RoPE is multimodal (`mrope_section` over the rotary dims); a text token's three positions are its one position,
    so on text it is the partial half-split RoPE Qwen3-Next's reference computes;
  * the vision tower (multimodal checkpoints that hold it): Qwen3-VL's (reference/qwen3_vl_vision.py
    `Qwen3VLVisionMixin`) under MaxText's `Qwen3_5MoeVision*` paths, without deepstack; on the image prompt the image
    tokens replace their embeddings and the full-attention layers turn each rotary frequency by its (t, h, w) position
    (interleaved `mrope_section`), as on Qwen3-VL.
"""

from __future__ import annotations

import dataclasses

from converters.families.qwen3_5 import ENCODER, NO_TOWER, PROJECTOR
from converters.verify.reference.common import Layout, ModelSpec, require, rope_halves
from converters.verify.reference.qwen3_next import LEGACY, Qwen3NextForward
from converters.verify.reference.qwen3_vl_vision import Qwen3VLVisionMixin, rope_frequency_positions, vision_spec


class Qwen3_5MoeForward(Qwen3VLVisionMixin, Qwen3NextForward):
    def make_spec(self, cfg) -> ModelSpec:
        t = cfg.get_text_config() if cfg.model_type == "qwen3_5_moe" else cfg
        t.norm_topk_prob = True  # transformers' Qwen3.5 router always renormalises the top-k, as MaxText does
        require(not getattr(t, "attention_bias", False), "attention_bias=true")
        if getattr(t, "intermediate_size", None) is None:  # every layer is MoE: base_spec reads it, the MoE width wins
            t.intermediate_size = t.moe_intermediate_size
        spec = super().make_spec(t)
        spec = dataclasses.replace(
            spec, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), model_type=cfg.model_type
        )
        return spec.with_options(**dict(self.vision_options(cfg)))

    @staticmethod
    def vision_options(cfg) -> tuple:
        """The tower's spec, the image token and the rotary sections, for a multimodal config whose checkpoint holds
        the tower (`NO_TOWER`: converters/families/qwen3_5.py `config_for_checkpoint`)."""
        if cfg.model_type != "qwen3_5_moe" or getattr(cfg, NO_TOWER, False) or cfg.vision_config is None:
            return ()
        rp = dict(getattr(cfg.get_text_config(), "rope_parameters", None) or {})
        require(rp.get("mrope_interleaved", True), "mrope_interleaved=false (MaxText's qwen3_5 interleaves)")
        return (
            ("vision", vision_spec(cfg.vision_config, encoder=ENCODER, projector=PROJECTOR)),
            ("image_token", int(cfg.image_token_id)),
            ("mrope_section", tuple(int(s) for s in rp.get("mrope_section") or (11, 11, 10))),
        )

    @staticmethod
    def rotary(x, positions, theta: float, dtype):
        """Text: Qwen3-Next's partial RoPE at the token's one position; image prompts: [T, r/2] per-frequency
        positions (`mrope_frequency_positions`)."""
        if positions.ndim == 1:
            return rope_halves(x, positions, theta, dtype)
        return rope_frequency_positions(x, positions, theta, dtype)

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        layout = super().detect_layout(spec, keys)
        if layout.scanned:
            layout.legacy = LEGACY  # Qwen3_5ScannableBlock's `layer_<p>` stacks: Qwen3-Next's legacy locations
        return layout

    def layout_warnings(self, spec: ModelSpec, layout: Layout) -> list[str]:
        return []
