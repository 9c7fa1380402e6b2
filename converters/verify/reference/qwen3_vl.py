"""Qwen3-VL's language model (HF `qwen3_vl` / `qwen3_vl_moe`) — MaxText decoder blocks `qwen3` / `qwen3_moe` with
`use_mrope: true`.

What MaxText computes on text (src/maxtext/models/qwen3.py, layers/attentions.py, layers/embeddings.py
`Qwen3OmniMoeThinkerTextRotaryEmbedding`): the Qwen3 / Qwen3-MoE layer (see qwen.py, qwen3_moe.py) with multimodal
RoPE in place of `RotaryEmbedding`. A text prompt's positions are 2-D ([B, S]); MaxText broadcasts each to
(t, h, w) = (p, p, p), so the interleaved section choice picks the same position for every frequency and the
rotation is half-split RoPE at angle p * (1 / theta^(2j/D)) -- a product with the inverse timescale, where
`RotaryEmbedding` divides, and sin/cos kept in float32 (the rotation is computed in float32 and cast back), where
`RotaryEmbedding` casts them to the input dtype first. HF's Qwen3-VL text rotary embedding does the same on text
(three equal position rows, `recomposition_frequencies`).

A prompt holding an image (multimodal checkpoints, reference/qwen3_vl_vision.py `Qwen3VLVisionMixin`): the tower's
image tokens replace the image-token embeddings, every token turns by its (temporal, height, width) positions
through the interleaved sections, and the deepstack features are added at the image tokens after the first layers.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from converters.verify.reference import qwen, qwen3_moe
from converters.verify.reference.common import ModelSpec, require, rope_parameters
from converters.verify.reference.qwen3_vl_vision import Qwen3VLVisionMixin

MULTIMODAL = ("qwen3_vl", "qwen3_vl_moe")


def rope_text_mrope(x, positions, theta: float, dtype):
    """MaxText's multimodal RoPE on text positions: x [T, H, D], positions [T]."""
    d = x.shape[-1]
    timescale = theta ** (2 * jnp.arange(d // 2, dtype=jnp.float32) / d)
    angle = positions.astype(jnp.float32)[:, None, None] * (1.0 / timescale)  # [T, 1, D/2]
    sin = jnp.sin(jnp.concatenate([angle, angle], axis=-1))  # float32, not cast to x's dtype
    cos = jnp.cos(jnp.concatenate([angle, angle], axis=-1))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return rotated.astype(dtype)


def text_spec(cfg, **overrides) -> tuple[object, dict]:
    """(text config, base_spec overrides) of a Qwen3-VL config: tying is the top-level flag transformers reads."""
    multimodal = cfg.model_type in MULTIMODAL
    t = cfg.get_text_config() if multimodal else cfg
    rp = rope_parameters(t)
    require(rp.get("rope_type", "default") == "default", f"rope_type={rp.get('rope_type')!r}")
    section = rp.get("mrope_section") or [24, 20, 20]
    head_dim = int(getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
    # MaxText raises at init unless the sections cover every frequency (embeddings.py)
    require(
        sum(section) == head_dim // 2, f"mrope_section {list(section)} does not sum to head_dim / 2 = {head_dim // 2}"
    )
    require(not getattr(t, "attention_bias", False), "attention_bias=true (MaxText's qwen3 blocks have no biases)")
    require(getattr(t, "hidden_act", "silu") == "silu", f"hidden_act={t.hidden_act!r}")
    fields = dict(tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), model_type=cfg.model_type)
    fields.update(overrides)
    return t, fields


class Qwen3VLForward(Qwen3VLVisionMixin, qwen.Qwen3Forward):
    """Qwen3-VL dense text model: Qwen3's layer with multimodal RoPE; the vision tower for image prompts."""

    rope = staticmethod(Qwen3VLVisionMixin.rope)  # on text positions: rope_text_mrope's numbers

    def make_spec(self, cfg) -> ModelSpec:
        t, fields = text_spec(cfg)
        spec = dataclasses.replace(super().make_spec(t), **fields)
        return spec.with_options(**dict(self.vision_options(cfg)))


class Qwen3VLMoeForward(Qwen3VLVisionMixin, qwen3_moe.Qwen3MoeForward):
    """Qwen3-VL-MoE text model: Qwen3-MoE's layer with multimodal RoPE (HF always renormalises the top-k weights, as
    MaxText's norm_topk_prob does); the vision tower for image prompts."""

    rope = staticmethod(Qwen3VLVisionMixin.rope)  # on text positions: rope_text_mrope's numbers

    def make_spec(self, cfg) -> ModelSpec:
        t, fields = text_spec(cfg)
        # transformers' Qwen3-VL-MoE router has no such flag: it always renormalises the top-k weights, as MaxText
        # (norm_topk_prob: true in the yml) does, whatever a config says
        t.norm_topk_prob = True
        spec = dataclasses.replace(super().make_spec(t), **fields)
        return spec.with_options(**dict(self.vision_options(cfg)))
