"""Gemma 4 small reference forward (per-layer inputs, KV-shared layers reusing their donor's K/V, double-wide shared
MLPs, the e2b 4 + 1 and e4b 5 + 1 patterns, otherwise the dense gemma4 block) and verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32, 300 tokens:
   KL < 1e-9 on both tiny models; the per-layer inputs and the KV donors are really exercised (leaving the inputs out,
   or taking K/V from another layer of the kind, no longer matches).
2. Converted checkpoints verify on the default prompts incl. the ~500-token one, with no warning; only the
   embedding is within the format's bound, every other tensor is exact.
3. One wrong mapping per transform the family has, each undone by its own inverse (so content passes): verify's
   layout check fails every one on two 4-token prompts by more than 100x its threshold.
4. A damaged checkpoint fails content, by name (a shared layer's and a donor's tensors).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.transforms import Kernel, Offset, Permute, Reshape, Scale
from converters.errors import UnsupportedModelError
from converters.families.gemma4_small import Gemma4Small
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from converters.verify.reference import gemma4_small as ref_module
from tests.families.test_gemma4_small import SHAPE, expected_layer
from tests.verify.helpers import (
    SHORT,
    assert_fails_layout_only,
    assert_reference_matches_transformers,
    hf_float32,
    hf_logits,
    restore_tree,
    save_tree,
    variants_cache,
)

EXACT_KL = 1e-9
PLE = "decoder/per_layer_embedder/"


def to_maxtext(folder: Path, family: str) -> dict:
    """float32 HF safetensors -> MaxText arrays with numpy, independently of the converter (unscanned
    `decoder/layers_<l>`, the per-layer embedder's arrays, the embedding times sqrt(hidden))."""
    cfg, hf = hf_float32(folder)
    out = {
        "token_embedder/embedding": hf["model.embed_tokens.weight"] * np.float32(math.sqrt(cfg["hidden_size"])),
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
        PLE + "embed_tokens_per_layer": hf["model.embed_tokens_per_layer.weight"],
        PLE + "per_layer_model_projection/kernel": hf["model.per_layer_model_projection.weight"].T,
        PLE + "per_layer_projection_norm/scale": hf["model.per_layer_projection_norm.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        out |= {f"decoder/layers_{i}/{k}": v for k, v in expected_layer(hf, family, i).items()}
    return out


@pytest.mark.parametrize("family", ["gemma4-e2b", pytest.param("gemma4-e4b", marks=pytest.mark.slow)])
def test_reference_matches_transformers(tiny_model, family):
    src = tiny_model(family, dtype="float32")
    assert_reference_matches_transformers(src, to_maxtext(src, family), EXACT_KL)


@pytest.mark.slow
def test_per_layer_inputs_and_kv_donors_are_applied(tiny_model, monkeypatch):
    """On 300 tokens (e2b: donors layer 5 for the shared local layers 6-8, layer 4 for the shared global layer 9):
    without the per-layer inputs, or with each kind's first layer as the donor, the reference no longer matches."""
    src = tiny_model("gemma4-e2b", dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    params = to_maxtext(src, "gemma4-e2b")
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    want = hf_logits(src, ids)
    assert kl_per_token(want, ReferenceModel(params, cfg).logits(ids)).max() < EXACT_KL
    with monkeypatch.context() as m:
        m.setattr(ref_module.Gemma4SmallForward, "prompt_extra", lambda self, spec, g, ids, x: {})
        assert kl_per_token(want, ReferenceModel(params, cfg).logits(ids)).mean() > 1e-3
    markers = ref_module.Gemma4SmallForward.layer_markers

    def first_of_kind(self, spec, l):  # layers 0 and 4 store their K/V, 5 does not
        out = {k: v for k, v in markers(self, spec, l).items() if k != ref_module.STORE_MARKER}
        if l in (0, 4):
            out[ref_module.STORE_MARKER] = np.zeros((0,), np.float32)
        return out

    monkeypatch.setattr(ref_module.Gemma4SmallForward, "layer_markers", first_of_kind)
    assert kl_per_token(want, ReferenceModel(params, cfg).logits(ids)).mean() > 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(family, scan=False)` -> (HF folder, bf16 unscanned checkpoint) of the tiny model, built once each."""
    return variants_cache(tmp_path_factory, 2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma4-e2b", "gemma4-e4b"])
def test_converted_checkpoint_verifies(converted, family, tmp_path):
    """A float32 checkpoint of the bf16 tiny model passes everything; the bf16 checkpoint passes content and layout,
    and its precision is exactly the format's cost: the embedding's bf16 rounding (x sqrt(72), 1 ulp on ~4% of the
    elements) alone moves this random tiny model by KL 0.034 (e2b; its top token at 7.6% of the positions), above
    MaxText's 0.015, as transformers on the checkpoint's values shows without MaxText."""
    hf, ckpt = converted(family, False)
    hf_to_maxtext(hf, tmp_path / "f32", scan=False, dtype="float32")
    for path in (tmp_path / "f32", ckpt):
        r = verify(maxtext=path, hf=hf)
        v = r.data["verdict"]
        assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
        assert v["content"]["passed"] and v["content"]["within_bound"] == (path == ckpt)  # the embedding, x sqrt(72)
        # float32 accumulation order only, on the ~500-token prompt: measured up to 2.3e-9 (e4b, bf16 checkpoint)
        assert v["layout"]["passed"] and v["layout"]["kl_max"] < 1e-8
        assert r.data["warnings"] == []
        if path != ckpt:
            assert r.passed and v["precision"]["kl_max"] < 1e-8, v  # the same values: accumulation order only
        else:
            fmt = r.data["comparisons"]["format"]["summary"]["kl_max"]
            assert abs(v["precision"]["kl_max"] - fmt) < 1e-3 * fmt, (v["precision"], fmt)


def _wrong_globals(kind: str):
    rules = Gemma4Small.global_rules

    def global_rules(d):
        out = []
        L, P, E = d.layers, d.extra["ple"], d.emb
        for r in rules.__func__(Gemma4Small, d):
            chain = r.chain
            if kind == "embedding_unscaled" and r.mt == "token_embedder/embedding":  # as HF stores it
                chain = ()
            elif kind == "ple_table_scaled" and r.mt.endswith("embed_tokens_per_layer"):  # as the main embedding
                chain = (Scale(math.sqrt(P)),)
            elif kind == "ple_projection_layer_order" and r.mt.endswith("per_layer_model_projection/kernel"):
                # columns (P, L) instead of (L, P)
                chain = (Kernel((E, L, P)), Permute((0, 2, 1)), Reshape((E, L * P), (E, P, L)))
            out.append(dataclasses.replace(r, chain=chain) if chain != r.chain else r)
        return out

    return classmethod(lambda cls, d: global_rules(d))


def _wrong_layers(kind: str):
    rules = Gemma4Small.kind_rules

    def kind_rules(d, glob, shared):
        out = []
        for r in rules.__func__(Gemma4Small, d, glob, shared):
            chain = r.chain
            if kind == "gate_reshaped_not_transposed" and r.hf.endswith("per_layer_input_gate.weight"):
                chain = (Reshape(r.mt_shape, r.hf_shape),)
            elif kind == "per_layer_norm_plus_one" and r.hf.endswith("post_per_layer_input_norm.weight"):
                chain = (Offset(1.0),)  # Gemma 2/3's 1 + w
            out.append(dataclasses.replace(r, chain=chain) if chain != r.chain else r)
        return tuple(out)

    return classmethod(lambda cls, d, glob, shared: kind_rules(d, glob, shared))


GLOBAL_WRONG = ["embedding_unscaled", "ple_table_scaled", "ple_projection_layer_order"]
LAYER_WRONG = ["gate_reshaped_not_transposed", "per_layer_norm_plus_one"]


@pytest.mark.parametrize(
    "kind",
    [
        *(pytest.param(k, marks=pytest.mark.slow) for k in GLOBAL_WRONG),
        *(pytest.param(k, marks=pytest.mark.slow) for k in LAYER_WRONG),
    ],
)
def test_a_mapping_wrong_both_ways_fails_layout(kind, tiny_model, tmp_path, monkeypatch):
    src = tiny_model("gemma4-e2b", dtype="float32")
    if kind in GLOBAL_WRONG:
        monkeypatch.setattr(Gemma4Small, "global_rules", _wrong_globals(kind))
    else:
        monkeypatch.setattr(Gemma4Small, "kind_rules", _wrong_layers(kind))
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    assert_fails_layout_only(tmp_path / "mt", src, tmp_path, kind)


@pytest.mark.slow
def test_damaged_checkpoint_fails_content_by_name(converted, tmp_path):
    """e2b: the q_norm scale of the shared layer 7 doubled, the key norm of its donor, layer 5, negated, and the
    per-layer projection norm halved."""
    hf, good = converted("gemma4-e2b", False)
    (tmp_path / "short.jsonl").write_text(SHORT)
    tree = restore_tree(good)
    dec = tree["params"]["params"]["decoder"]
    for layer, module, factor in ((7, "query_norm", 2.0), (5, "key_norm", -1.0)):
        norm = dec[f"layers_{layer}"]["self_attention"][module]
        norm["scale"] = (np.array(norm["scale"]).astype(np.float32) * factor).astype(norm["scale"].dtype)
    ple = dec["per_layer_embedder"]["per_layer_projection_norm"]
    ple["scale"] = (np.array(ple["scale"]).astype(np.float32) * 0.5).astype(ple["scale"].dtype)
    r = verify(maxtext=save_tree(tree, good, tmp_path / "bad"), hf=hf, prompts_file=tmp_path / "short.jsonl")
    assert not r.passed and {f["tensor"] for f in r.data["verdict"]["content"]["failures"]} == {
        "model.layers.7.self_attn.q_norm.weight",
        "model.layers.5.self_attn.k_norm.weight",
        "model.per_layer_projection_norm.weight",
    }


def test_configs_the_reference_refuses(tiny_model):
    from converters.verify.reference.common import hf_config_object

    cfg = json.loads((tiny_model("gemma4-e2b") / "config.json").read_text())
    fwd = ref_module.Gemma4SmallForward()
    spec = fwd.make_spec(hf_config_object(cfg))
    assert (spec.option("period"), spec.option("kv_shared"), spec.option("ple")) == (5, 4, 8)
    for changes, reason in (
        ({"attention_k_eq_v": True}, "attention_k_eq_v"),
        ({"layer_types": ["sliding_attention", "full_attention"] * 5}, "layer pattern"),
    ):
        with pytest.raises(UnsupportedModelError, match=reason):
            fwd.make_spec(hf_config_object({**cfg, **changes}))
    with pytest.raises(Exception, match="scan_layers=false only"):
        fwd.detect_layout(spec, ["decoder/layers/self_attention/query/kernel"])
    assert SHAPE["gemma4-e2b"][1] == 5


def test_a_following_hf_stream_takes_the_shared_kv_states_too():
    """verify's checkpoint-side HF stream skips a layer whose weights and input equal the source stream's and takes its
    output (`HFPrompt.follow`); with KV sharing it must take the K/V that layer stored as well, or a later shared layer
    it does run finds no donor."""
    from converters.verify.hf_side import HFPrompt

    theirs, mine = {"sliding_attention": ("k", "v")}, {}
    a = HFPrompt("x_a", [((), {"shared_kv_states": theirs})] * 3)
    b = HFPrompt("x_b", [((), {"shared_kv_states": mine})] * 3)
    b.follow(a)
    assert b.x == "x_a" and mine == theirs and all(kw["shared_kv_states"] is mine for _, kw in b.layer_kwargs)
    plain = HFPrompt("y", [((), {})])
    plain.follow(HFPrompt("z", [((), {})]))
    assert plain.x == "z"
