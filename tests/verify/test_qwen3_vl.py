"""Qwen3-VL's language model: the reference (Qwen3 / Qwen3-MoE layer, MaxText's multimodal RoPE on text positions)
and verification.

1. The JAX reference against transformers' Qwen3VL(Moe)ForConditionalGeneration on text, on weights laid out by numpy
   (not the converter), float32, 300 tokens: KL < 1e-9 (measured ~1e-13).
2. On text positions MaxText's multimodal RoPE is plain half-split RoPE (the interleaved sections pick the same
   position for every frequency): float32 results agree with RotaryEmbedding's; in bfloat16 it rotates in float32.
3. Converted checkpoints verify on the default prompts, incl. the ~500-token one (float32 KL ~1e-13).
4. Plausible wrong mappings: the fused gate_up_proj split as GPT-OSS's (interleaved columns), and Llama's interleaved
   RoPE on q/k. The inverse undoes each, so content passes; layout fails by far more than 100x its threshold.
5. A damaged checkpoint (q/k permuted) fails content by name.

Measured against MaxText 0.2.5 itself (bench/maxtext_logits.py, use_multimodal=false,
deepstack_visual_indexes_for_vit=[], float32, 128 random tokens, tiny 3-layer models converted by ckptflow):
KL(HF || MaxText) max 1.3e-13 (MoE unscanned),
1.5e-13 (MoE scanned), 7.1e-7 (dense tied, scanned: MaxText's bfloat16 cast of the tied table in the logits;
KL(reference with bf16_tied_logits || MaxText) 1.3e-13); a 2-layer qwen3-vl-2b at real dimensions, bfloat16
checkpoint, 64 tokens: 2.3e-12.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.transforms import Deinterleave
from converters.families import common
from converters.families.qwen3_vl import Qwen3VL, Qwen3VLMoe
from converters.verify import verify
from tests.families.helpers import attention_kernels, mlp_kernels, qk_norms
from tests.families.test_qwen3_vl_vision import maxtext_hooks
from tests.verify.helpers import (
    SHORT,
    assert_fails_layout_only,
    assert_reference_matches_transformers,
    hf_float32,
    stack_layers,
)

LAYERS, EXACT_KL = 3, 1e-9
T = "model.language_model."
pytestmark = pytest.mark.filterwarnings("ignore:qwen3-vl:UserWarning")  # the vision tower is skipped (tested there)


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter (MaxText's QWEN3_VL mapping and
    hooks: q/k/v/o reshaped, the fused experts' gate_up_proj cut in halves on its last axis)."""
    cfg, hf = hf_float32(folder)
    t = cfg["text_config"]
    e, n, k, d = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    out = {
        "token_embedder/embedding": hf[T + "embed_tokens.weight"],
        "decoder/decoder_norm/scale": hf[T + "norm.weight"],
    }
    if not cfg["tie_word_embeddings"]:
        out["decoder/logits_dense/kernel"] = hf["lm_head.weight"].T
    layers = []
    for i in range(t["num_hidden_layers"]):
        p, a = f"{T}layers.{i}.", f"{T}layers.{i}.self_attn."
        lay = {
            "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
            **attention_kernels(hf, a, e, n, k, d),
            **qk_norms(hf, a),
        }
        if "moe_intermediate_size" in t:
            f = t["moe_intermediate_size"]
            gate_up = hf[p + "mlp.experts.gate_up_proj"]
            lay["moe_block/gate/kernel"] = hf[p + "mlp.gate.weight"].T
            lay["moe_block/wi_0"], lay["moe_block/wi_1"] = gate_up[..., :f], gate_up[..., f:]
            lay["moe_block/wo"] = hf[p + "mlp.experts.down_proj"]
        else:
            lay |= mlp_kernels(hf, p + "mlp.")
        layers.append(lay)
    # the tower as MaxText's hooks lay it out: a multimodal config's reference reads it (used by image prompts only)
    return out | stack_layers(layers, scan) | maxtext_hooks(hf, cfg["vision_config"])


@pytest.mark.parametrize(
    "scan, family",
    [
        pytest.param(True, "qwen3-vl-moe", marks=pytest.mark.slow),
        pytest.param(False, "qwen3-vl", marks=pytest.mark.slow),
        pytest.param(True, "qwen3-vl", marks=pytest.mark.slow),
        pytest.param(False, "qwen3-vl-moe", marks=pytest.mark.slow),
    ],
)
def test_reference_matches_transformers(tiny_model, family, scan):
    src = tiny_model(family, layers=LAYERS, dtype="float32")
    assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)


@pytest.mark.slow
def test_multimodal_rope_on_text_is_half_split_rope():
    """MaxText's Qwen3OmniMoeThinkerTextRotaryEmbedding with (p, p, p) positions == RotaryEmbedding at p, to float32
    rounding of the angle (product vs quotient): below 1e-5 absolute on unit-scale inputs at positions up to 4096."""
    import jax.numpy as jnp

    from converters.verify.reference.common import rope_halves
    from converters.verify.reference.qwen3_vl import rope_text_mrope

    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 2, 128)), jnp.float32)
    pos = jnp.asarray(np.r_[np.arange(32), np.arange(4064, 4096)], jnp.int32)
    mrope, halves = rope_text_mrope, rope_halves  # eagerly: op by op, as the statement says (no fusion)
    a, b = mrope(x, pos, 5e6, jnp.float32), halves(x, pos, 5e6, jnp.float32)
    assert float(jnp.abs(a - b).max()) < 1e-5  # the same rotation (measured: identical on CPU)
    assert float(jnp.abs(a[0] - x[0]).max()) == 0.0  # position 0: the identity
    # bfloat16: MaxText's multimodal RoPE rotates in float32 (sin/cos not cast), RotaryEmbedding in bfloat16
    xb = x.astype(jnp.bfloat16)
    a16, b16 = mrope(xb, pos, 5e6, jnp.bfloat16), halves(xb, pos, 5e6, jnp.bfloat16)
    exact = mrope(xb.astype(jnp.float32), pos, 5e6, jnp.float32).astype(jnp.bfloat16)
    assert bool(jnp.all(a16 == exact)) and not bool(jnp.all(b16 == exact))


# the default run's end-to-end check: content, layout (the reference against transformers, float32, KL < 1e-9) and
# precision on the default prompts, the ~500-token one included, and the tower's image prompt (~30 s here)
@pytest.mark.parametrize(
    "family, scan", [("qwen3-vl-moe", True), pytest.param("qwen3-vl", False, marks=pytest.mark.slow)]
)
def test_converted_checkpoint_verifies(tiny_model, tmp_path, family, scan):
    src = tiny_model(family, layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    r = verify(maxtext=tmp_path / "mt", hf=src)
    assert r.passed and r.data["verdict"]["layout"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert r.data["verdict"]["content"]["bit_exact"] == r.data["verdict"]["content"]["tensors"]
    prompts = {p["name"]: p for p in r.data["prompts"]}
    assert prompts["long"]["num_tokens"] >= 400 and "image" in prompts  # the tower converts in either layout


@pytest.mark.parametrize("mistake", ["gpt-oss-gate-up-split", pytest.param("llama-rope", marks=pytest.mark.slow)])
def test_plausible_wrong_mapping_fails_layout(tiny_model, tmp_path, monkeypatch, mistake):
    """GPT-OSS's fused gate_up_proj interleaves gate and up columns; Qwen3-VL's holds them in halves. Llama's rules
    interleave q/k's RoPE halves; MaxText's multimodal RoPE rotates halves."""
    if mistake == "gpt-oss-gate-up-split":
        family, cls, attr, right = "qwen3-vl-moe", Qwen3VLMoe, "mlp_rules", Qwen3VLMoe.mlp_rules

        def wrong(cls, d, p):
            return [dataclasses.replace(r, split=Deinterleave(2, axis=-1)) if r.split else r for r in right(d, p)]

    else:
        family, cls, attr, right = "qwen3-vl", Qwen3VL, "layer_rules", Qwen3VL.layer_rules

        def wrong(cls, d):
            p = d.extra["prefix"] + "layers.{i}."
            llama = {r.hf: r for r in common.attention(d, rope_interleave=True, scale_query=False, prefix=p)}
            return [llama.get(r.hf, r) for r in right(d)]

    src = tiny_model(family, layers=LAYERS, dtype="float32")
    monkeypatch.setattr(cls, attr, classmethod(wrong))
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    assert_fails_layout_only(tmp_path / "mt", src, tmp_path, mistake)


@pytest.mark.slow
def test_permuted_query_and_key_fail_content_by_name(damaged, tmp_path):
    hf, broken = damaged("qwen3-vl", "wrong_rope_permutation", True)
    (tmp_path / "short.jsonl").write_text(SHORT)
    r = verify(maxtext=broken, hf=hf, prompts_file=tmp_path / "short.jsonl")
    failed = {f["tensor"] for f in r.data["verdict"]["content"]["failures"]}
    assert not r.passed and {f"{T}layers.1.self_attn.q_proj.weight", f"{T}layers.1.self_attn.k_proj.weight"} <= failed
