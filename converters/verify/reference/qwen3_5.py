"""Qwen3.5 MoE's language model (HF `qwen3_5_moe`) — MaxText decoder block `qwen3_5`.

MaxText's Qwen3.5 layers are Qwen3-Next's unchanged (src/maxtext/models/qwen3_5.py subclasses the Qwen3-Next gated
delta net, gated attention and sparse MoE without overrides), so the computation is `Qwen3NextForward`'s; what differs:
  * the text model's config is `text_config` (tying: the top-level flag transformers reads);
  * scanned, every cycle position is its own stack, `decoder/layers/layer_<p>` (layers p, p + 4, ...): MaxText's
    `Qwen3_5ScannableBlock` -- the layout MaxText loads, so no warning;
  * RoPE is multimodal (`mrope_section` over the rotary dims); a text token's three positions are its one position,
    so on text it is the partial half-split RoPE Qwen3-Next's reference computes.
"""

from __future__ import annotations

import dataclasses

from converters.verify.reference.common import Layout, ModelSpec, require
from converters.verify.reference.qwen3_next import LEGACY, Qwen3NextForward


class Qwen3_5MoeForward(Qwen3NextForward):
    def make_spec(self, cfg) -> ModelSpec:
        t = cfg.get_text_config() if cfg.model_type == "qwen3_5_moe" else cfg
        t.norm_topk_prob = True  # transformers' Qwen3.5 router always renormalises the top-k, as MaxText does
        require(not getattr(t, "attention_bias", False), "attention_bias=true")
        if getattr(t, "intermediate_size", None) is None:  # every layer is MoE: base_spec reads it, the MoE width wins
            t.intermediate_size = t.moe_intermediate_size
        spec = super().make_spec(t)
        return dataclasses.replace(
            spec, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), model_type=cfg.model_type
        )

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        layout = super().detect_layout(spec, keys)
        if layout.scanned:
            layout.legacy = LEGACY  # Qwen3_5ScannableBlock's `layer_<p>` stacks: Qwen3-Next's legacy locations
        return layout

    def layout_warnings(self, spec: ModelSpec, layout: Layout) -> list[str]:
        return []
