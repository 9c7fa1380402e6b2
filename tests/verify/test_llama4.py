"""Llama 4 text reference (chunked / NoPE attention, qk L2 norm, temperature tuning, top-1 sigmoid-scaled experts
plus a shared expert, interleaved dense layers) and verification.

1. The JAX reference against transformers on weights laid out by numpy (tests/families/test_llama4.py's layout,
   not the converter), float32, 300 tokens (the tiny 32-token chunk is crossed many times): KL < 1e-9, Scout's
   path (all MoE, qk norm, llama3 rope scaling) and Maverick's (dense + MoE), scanned and unscanned.
2. Each config path is exercised: the reference without the chunk, without the qk norm, or with RoPE on the NoPE
   layer must fail to match.
3. Converted checkpoints verify on the default prompts, including the long one (> 10 chunks).
4. The plausible wrong mappings fail layout by > 100x its threshold while content passes (their inverse undoes
   them): Llama 3.1's RoPE permutation (MaxText's llama_or_mistral_ckpt permutes for llama3, not for llama4), and
   the baked 1/sqrt(head_dim) query scale (that script's default `scale_query`, which llama4 sets to False since
   the block scales at run time).
5. A multimodal folder (Llama4ForConditionalGeneration, `language_model.*` + the vision tower, converted too)
   verifies against its conversion on text prompts: transformers' Llama4ForConditionalGeneration (which loads the
   tower: its tensors are content-checked with the other globals) running its language model on one side, the
   reference on `text_config` on the other, and an image prompt through the tower (tests/verify/test_llama4_vision.py).

MaxText 0.2.5's own forward (bench/maxtext_logits.py in its venv, model names llama4-17b-16e / -128e with the tiny
dimensions) on ckptflow's float32 conversions of 8-layer tiny models, 300 random tokens (9 chunk boundaries), against
transformers: KL max 6.7e-13 / 7.3e-13 (Scout's path, scanned / unscanned) and 1.2e-13 / 1.2e-13 (Maverick's), top-1
identical on every token. So MaxText computes what transformers does on these checkpoints, chunks and NoPE layers
included. Temperature tuning acts only past 8192 tokens: on 8300 tokens (Scout's path, unscanned) MaxText vs
transformers KL max 8.6e-10 (2.3e-10 on the tokens past 8191), the JAX reference vs transformers 9.5e-10 (8.0e-11),
vs MaxText 8.7e-10 (2.3e-10): float32 summation over 8300 keys; too slow for a test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from converters.families import common
from converters.families.llama4 import Llama4
from converters.verify import verify
from converters.verify.reference.llama4 import Llama4Forward
from tests.families.helpers import hf_tensors, model_cache
from tests.families.test_llama4 import expected_layer
from tests.verify.helpers import (
    assert_fails_layout_only,
    assert_reference_matches_transformers,
    converted_cache,
    embed_and_head,
    hf_float32,
)

LAYERS = 4
EXACT_KL = 1e-9
MODELS = {"scout": "llama4", "maverick": "llama4-interleaved", "multimodal": "llama4-mm"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: model_cache(tmp_path_factory, v, LAYERS) for k, v in MODELS.items()}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    return {k: converted_cache(m, tmp_path_factory, MODELS[k]) for k, m in models.items()}


def to_maxtext(folder: Path, scan: bool) -> dict:
    cfg, hf = hf_float32(folder)
    step = cfg["interleave_moe_layer_step"]
    layers = [expected_layer(hf, i, (i + 1) % step == 0) for i in range(cfg["num_hidden_layers"])]
    out = embed_and_head(hf)
    if not scan:
        out.update({f"decoder/layers_{i}/{k}": v for i, lay in enumerate(layers) for k, v in lay.items()})
        return out
    for p in range(4):
        for k in layers[p]:
            out[f"decoder/layers/layers_{p}/{k}"] = np.stack([lay[k] for lay in layers[p::4]], axis=1)
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("which", ["scout", "maverick"])
def test_reference_matches_transformers(models, which, scan):
    src = models[which]("float32")
    ref = assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)
    assert ref.scanned == scan


@pytest.mark.parametrize(
    "change",
    [{"chunk": 0}, {"qk_norm": False}, "rope-everywhere"],
    ids=["no-chunk", "no-qk-norm", "rope-on-nope-layer"],
)
def test_each_config_path_is_exercised(models, monkeypatch, change):
    """Drop one feature from the reference: it must no longer match transformers (scout, unscanned)."""
    real = Llama4Forward.make_spec
    if change == "rope-everywhere":
        monkeypatch.setattr(Llama4Forward, "layer_markers", lambda self, spec, l: {})
    else:
        monkeypatch.setattr(Llama4Forward, "make_spec", lambda self, cfg: real(self, cfg).with_options(**change))
    src = models["scout"]("float32")
    with pytest.raises(AssertionError):
        assert_reference_matches_transformers(src, to_maxtext(src, False), 1e-4)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("which", ["scout", "maverick"])
def test_converted_checkpoint_verifies(models, converted, which, scan):
    r = verify(maxtext=converted[which](scan), hf=models[which]())
    s = r.data["summary"]
    assert r.passed and s["kl_max"] < EXACT_KL, s
    assert r.data["prompts"][-1]["num_tokens"] > 10 * 32  # the long prompt crosses the 32-token chunk
    assert r.data["maxtext"]["layout"] == ("scanned" if scan else "unscanned")
    assert r.data.get("warnings", []) == [] or all("attention_chunk_size" in w for w in r.data["warnings"])


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_multimodal_folder_verifies(models, converted, scan):
    r = verify(maxtext=converted["multimodal"](scan), hf=models["multimodal"]())
    s = r.data["summary"]
    assert r.passed and s["kl_max"] < EXACT_KL and r.data["verdict"]["layout"]["kl_max"] < EXACT_KL, s
    assert r.data["verdict"]["content"]["passed"]
    # every tensor of the folder content-checked bit-exact, the vision tower's 42 too
    tensors = hf_tensors(models["multimodal"]())
    assert sum(k.startswith(("vision_model.", "multi_modal_projector.")) for k in tensors) == 42
    assert r.data["verdict"]["content"]["bit_exact"] == r.data["verdict"]["content"]["tensors"] == len(tensors)
    assert r.data["reference"]["model_type"] == "llama4" and r.data["maxtext"]["num_layers"] == LAYERS
    prompts = {p["name"]: p for p in r.data["prompts"]}
    assert prompts["long"]["num_tokens"] > 10 * 32 and "image" in prompts  # the image prompt: test_llama4_vision.py
    assert all("attention_chunk_size" in w or "image_token_index" in w for w in r.data["warnings"]), r.data["warnings"]


def _with_attention(monkeypatch, **flags):
    real = Llama4.kind_rules.__func__

    def wrong(cls, d, moe):
        rules = list(real(cls, d, moe))
        attn = {r.mt: r for r in common.attention(d, **flags)}
        return tuple(
            attn.get(r.mt, r) if isinstance(r.mt, str) and r.mt.startswith("self_attention/") else r for r in rules
        )

    monkeypatch.setattr(Llama4, "kind_rules", classmethod(wrong))


@pytest.mark.parametrize(
    "which, flags",
    [
        ("scout", dict(rope_interleave=True, scale_query=False)),
        ("maverick", dict(rope_interleave=False, scale_query=True)),
    ],
    ids=["llama3-rope-permutation", "baked-query-scale"],
)
def test_plausible_wrong_mappings_fail_layout(models, tmp_path, monkeypatch, which, flags):
    """The baked scale on Maverick's path: with Scout's qk L2 norm it only shows on the NoPE layer (the norm removes
    it on RoPE layers; measured there: layout KL 1.0e-4, 10x the threshold, not 100x)."""
    from converters.convert import hf_to_maxtext

    _with_attention(monkeypatch, **flags)
    src = models[which]()
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    assert_fails_layout_only(tmp_path / "mt", src, tmp_path, str(flags))


def test_reference_refuses_what_maxtext_cannot_express(models):
    import json

    from converters.errors import UnsupportedModelError
    from converters.verify.reference.common import hf_config_object

    cfg = json.loads((models["maverick"]() / "config.json").read_text())
    for bad, what in (
        ({"num_experts_per_tok": 2}, "top-1"),
        ({"no_rope_layers": [1, 0, 1, 0]}, "every 4th"),
        ({"floor_scale": 16}, "hard-codes"),
        ({"attention_chunk_size": None, "layer_types": None}, "chunks"),
    ):
        with pytest.raises(UnsupportedModelError, match=what):
            Llama4Forward().make_spec(hf_config_object({**cfg, **bad}))
    assert dataclasses.is_dataclass(Llama4Forward().make_spec(hf_config_object(cfg)))
