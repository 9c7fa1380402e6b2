"""Gemma 4 reference forward (plain-scale norms, q/k/v norms, keys as values on global layers, partial RoPE on global
layers, sliding window on local ones, layer scalars, soft-capped tied logits; 26b's MoE block: shared expert, scaled
router, top-k of the softmax renormalised, per-expert scales, streamed experts) and verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32, 300 tokens:
   KL < 1e-9, scanned and unscanned, with and without `attention_k_eq_v`; the window, the global layers' partial
   RoPE and the final soft-cap are really exercised (leaving one out no longer matches).
2. Converted checkpoints verify on the default prompts incl. the ~500-token one, with no warning; only the
   embedding is within the format's bound, every other tensor is exact.
3. One wrong mapping per transform the family has, each undone by its own inverse (so content passes): verify's
   layout check fails every one on two 4-token prompts by more than 100x its threshold.
4. A damaged checkpoint fails content, by name.

The MoE model (`gemma4-moe`) has the same checks: the reference against transformers (KL < 1e-9; without the
per-expert scale or the router scale it no longer matches), converted float32 checkpoints verify with the experts
streamed (at most 3 held at once), and one wrong mapping per MoE transform fails layout. Its bfloat16 runs are not a
precision check: on a random tiny MoE (4 experts, near-uniform router) a 1-ulp change moves a near-tied top-2 choice,
and transformers' own bfloat16 run is as far from its float32 one (measured: KL 0.34 max on the long prompt, for
transformers and the reference alike), so the MoE checkpoints verify in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.mapping import LayerGroup
from converters.core.transforms import Kernel, Offset, Permute, Reshape, RopeInterleave, Scale
from converters.errors import UnsupportedModelError
from converters.families.gemma4 import GLOBAL, LOCAL, MOE, Gemma4
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from tests.families.helpers import gemma4_layer
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

LAYERS, P = 12, 6
SLOW = pytest.mark.slow  # the MoE model's heavier checks (the default run's time budget)
EXACT_KL = 1e-9


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter (src/maxtext/models/gemma4.py
    names; scanned: HF layer 6b + p is entry (b, p) of `local_layers` (axes 1, 2) for p < 5, entry b of
    `global_layer`)."""
    cfg, hf = hf_float32(folder)
    e, n = cfg["hidden_size"], cfg["num_attention_heads"]
    glob_shape = next(iter(cfg["per_layer_config"].values()))
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        glob = i % P == P - 1
        k, d = (
            (glob_shape.get("num_key_value_heads", cfg["num_key_value_heads"]), glob_shape["head_dim"])
            if glob
            else (cfg["num_key_value_heads"], cfg["head_dim"])
        )
        layers.append(gemma4_layer(hf, i, e, n, k, d))
    out = {
        "token_embedder/embedding": hf["model.embed_tokens.weight"] * np.float32(math.sqrt(e)),
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
    }
    if not scan:
        return out | {f"decoder/layers_{i}/{key}": v for i, lay in enumerate(layers) for key, v in lay.items()}
    blocks = len(layers) // P
    local = [[layers[b * P + q] for q in range(P - 1)] for b in range(blocks)]
    out |= {
        f"{LOCAL}/{key}": np.stack([np.stack([lay[key] for lay in row], axis=1) for row in local], axis=1)
        for key in layers[0]
    }
    glob = [layers[b * P + P - 1] for b in range(blocks)]
    return out | {f"{GLOBAL}/{key}": np.stack([lay[key] for lay in glob], axis=1) for key in glob[0]}


@pytest.mark.parametrize(
    "scan, family",
    [
        *((scan, family) for family in ("gemma4", "gemma4-kv") for scan in (True, False)),
        (True, "gemma4-moe"),
        pytest.param(False, "gemma4-moe", marks=SLOW),
    ],
    ids=lambda v: {True: "scanned", False: "unscanned"}.get(v, v),
)
def test_reference_matches_transformers(tiny_model, family, scan):
    src = tiny_model(family, layers=LAYERS, dtype="float32")
    assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)


@SLOW
def test_the_router_scales_are_applied(tiny_model):
    """Both scales the router adds to a plain softmax top-k act: with either set to ones the reference no longer
    matches transformers (and the routed experts matter: without them neither)."""
    src = tiny_model("gemma4-moe", layers=LAYERS, dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    params = to_maxtext(src, True)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    want = hf_logits(src, ids)
    for key in (f"{MOE}/per_expert_scale", "mlp/pre_forward_scale_2", f"{MOE}/wo"):
        changed = {
            k: (np.ones_like(v) if key != f"{MOE}/wo" else np.zeros_like(v)) if k.endswith(key) else v
            for k, v in params.items()
        }
        kl = kl_per_token(want, ReferenceModel(changed, cfg).logits(ids))
        print(key, "KL max", kl.max())
        assert kl.max() > 1e-4, key


def test_the_window_the_partial_rope_and_the_softcap_are_applied(tiny_model):
    """On 300 tokens: without the 8-token window the reference matches HF only within it; with RoPE over the whole
    global head, or without the soft-cap, it no longer matches."""
    src = tiny_model("gemma4", layers=LAYERS, dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    params = to_maxtext(src, True)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    want = hf_logits(src, ids)
    no_window = kl_per_token(want, ReferenceModel(params, {**cfg, "sliding_window": 4096}).logits(ids))
    assert no_window[:8].max() < EXACT_KL and no_window.max() > 1e-3
    full = {**cfg["rope_parameters"]["full_attention"], "partial_rotary_factor": 1.0}
    whole_head = {**cfg, "rope_parameters": {**cfg["rope_parameters"], "full_attention": full}}
    assert kl_per_token(want, ReferenceModel(params, whole_head).logits(ids))[1:].mean() > 1e-4
    uncapped = kl_per_token(want, ReferenceModel(params, {**cfg, "final_logit_softcapping": None}).logits(ids))
    assert uncapped.min() > 1e-5  # far above EXACT_KL at every position


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(family, scan)` -> (HF folder, bf16 checkpoint) of the 12-layer tiny model, built once each."""
    return variants_cache(tmp_path_factory, LAYERS)


@pytest.mark.parametrize("family", ["gemma4", "gemma4-kv"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(converted, family, scan):
    hf, ckpt = converted(family, scan)
    r = verify(maxtext=ckpt, hf=hf)
    v = r.data["verdict"]
    assert r.passed, v
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    assert v["content"]["passed"] and v["content"]["within_bound"] == 1  # the embedding, times sqrt(72)
    assert v["layout"]["kl_max"] < EXACT_KL
    assert r.data["warnings"] == []


@pytest.fixture(scope="module")
def moe_f32(tmp_path_factory):
    """`moe_f32(scan)` -> (HF folder, checkpoint) of the 12-layer gemma4-moe model, both float32, built once each."""
    from converters.tiny_models import make_test_model

    root = tmp_path_factory.mktemp("gemma4-moe-f32")
    hf = make_test_model("gemma4-moe", root / "hf", layers=LAYERS, dtype="float32")
    cache: dict = {}

    def make(scan: bool):
        if scan not in cache:
            hf_to_maxtext(hf, root / f"mt-{scan}", scan=scan, dtype="float32")
            cache[scan] = root / f"mt-{scan}"
        return hf, cache[scan]

    return make


@SLOW
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_moe_checkpoint_verifies_with_streamed_experts(moe_f32, scan, monkeypatch):
    """float32 (see the module docstring): passes with no warning, the embedding the one tensor within its bound; every
    MoE layer reads each expert it uses once, and holds at most EXPERT_WINDOW + 1 of them."""
    from converters.verify import experts

    held = []
    run = experts.ExpertFeed.run

    def tracked_run(self, jobs):
        run(self, jobs)
        held.append((self.reads, self.peak))

    monkeypatch.setattr(experts.ExpertFeed, "run", tracked_run)
    hf, ckpt = moe_f32(scan)
    r = verify(maxtext=ckpt, hf=hf)
    v = r.data["verdict"]
    assert r.passed, v
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    assert v["content"]["passed"] and v["content"]["within_bound"] == 1
    assert v["layout"]["kl_max"] < EXACT_KL and r.data["warnings"] == []
    assert len(held) == LAYERS and all(reads <= 4 and peak <= 3 for reads, peak in held), held
    assert r.data["timing"]["expert_reads"] == sum(reads for reads, _ in held)


def _wrong(kind: str):
    """Gemma4's rules with one mistake per kind of transform the family has, undone by its inverse."""
    rules = Gemma4.kind_rules

    def kind_rules(d, glob):
        out = []
        for r in rules.__func__(Gemma4, d, glob):
            chain, mt = r.chain, r.mt
            if kind == "rope_interleaved" and r.hf.endswith(("q_proj.weight", "k_proj.weight")):  # Llama 3.1's layout
                chain = (*chain, RopeInterleave())
            elif kind == "query_scale_baked" and r.hf.endswith("q_norm.weight"):
                # a 1/sqrt(head_dim) that MaxText's gemma4 block does not apply (query_pre_attn_scalar 1.0); in the
                # query kernel the q norm that follows would remove it, in the norm's scale it acts
                chain = (Scale(r.hf_shape[0] ** -0.5),)
            elif kind == "norm_plus_one" and r.hf.endswith("layernorm.weight"):  # Gemma 2/3's 1 + w
                chain = (Offset(1.0),)
            elif kind == "out_heads_and_dims_swapped" and r.hf.endswith("o_proj.weight"):
                n, dd, e = r.mt_shape
                chain = (Kernel((dd, n, e), n_in=2), Permute((1, 0, 2)))
            elif kind == "pre_post_norms_swapped" and r.hf.endswith(
                ("input_layernorm.weight", "attention_layernorm.weight")
            ):
                mt = "post_self_attention_norm/scale" if "input" in r.hf else "pre_self_attention_norm/scale"
            elif kind == "gate_for_up" and r.hf.endswith(("gate_proj.weight", "up_proj.weight")):
                mt = "mlp/wi_1/kernel" if "gate" in r.hf else "mlp/wi_0/kernel"
            elif kind == "expert_gate_up_swapped" and r.hf.endswith("experts.gate_up_proj"):
                mt = tuple(reversed(r.mt))  # the up half as wi_0
            elif kind == "router_not_transposed" and r.hf.endswith("router.proj.weight"):
                chain = (Reshape(r.mt_shape, r.hf_shape),)
            elif kind == "expert_down_not_transposed" and r.hf.endswith("experts.down_proj"):
                chain = (Reshape(r.mt_shape, r.hf_shape),)
            elif kind == "shared_routed_norms_swapped" and r.hf.endswith(
                ("post_feedforward_layernorm_1.weight", "post_feedforward_layernorm_2.weight")
            ):
                mt = r.mt.replace("_1/", "_2/") if "_1." in r.hf else r.mt.replace("_2/", "_1/")
            elif kind == "router_scale_for_experts_norm" and r.hf.endswith(
                ("router.scale", "pre_feedforward_layernorm_2.weight")
            ):
                mt = "mlp/pre_feedforward_layernorm_2/scale" if "router" in r.hf else "mlp/pre_forward_scale_2"
            out.append(dataclasses.replace(r, chain=chain, mt=mt) if (chain, mt) != (r.chain, r.mt) else r)
        return tuple(out)

    return classmethod(lambda cls, d, glob: kind_rules(d, glob))


def _transposed_blocks(cls, d, scan):
    """The nested local stack in the wrong order: [.., 5, blocks, ..] read as (position, block)."""
    blocks = d.layers // P
    local = tuple(b * P + q for q in range(P - 1) for b in range(blocks))
    glob = tuple(b * P + P - 1 for b in range(blocks))
    return [
        LayerGroup(cls.kind_rules(d, False), local, LOCAL, (), stack=(blocks, P - 1)),
        LayerGroup(cls.kind_rules(d, True), glob, GLOBAL, ()),
    ]


WRONG = [
    "rope_interleaved",
    "query_scale_baked",
    "norm_plus_one",
    "out_heads_and_dims_swapped",
    "pre_post_norms_swapped",
    "gate_for_up",
    "layer_stacks",
]


# one per transform of the MoE block (26b): the fused experts' split, the router's and experts' transposes, and two
# plausible mix-ups of same-shaped vectors
WRONG_MOE = [
    "expert_gate_up_swapped",
    pytest.param("router_not_transposed", marks=SLOW),
    pytest.param("expert_down_not_transposed", marks=SLOW),
    pytest.param("shared_routed_norms_swapped", marks=SLOW),
    pytest.param("router_scale_for_experts_norm", marks=SLOW),
]


@pytest.mark.parametrize("kind", WRONG_MOE)
def test_a_moe_mapping_wrong_both_ways_fails_layout(kind, tiny_model, tmp_path, monkeypatch):
    test_a_mapping_wrong_both_ways_fails_layout(kind, tiny_model, tmp_path, monkeypatch, family="gemma4-moe")


@pytest.mark.parametrize("kind", WRONG)
def test_a_mapping_wrong_both_ways_fails_layout(kind, tiny_model, tmp_path, monkeypatch, family="gemma4"):
    src = tiny_model(family, layers=LAYERS, dtype="float32")
    if kind == "layer_stacks":
        monkeypatch.setattr(Gemma4, "layer_groups", classmethod(_transposed_blocks))
    else:
        monkeypatch.setattr(Gemma4, "kind_rules", _wrong(kind))
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    assert_fails_layout_only(tmp_path / "mt", src, tmp_path, kind)


def test_damaged_checkpoint_fails_content_by_name(converted, tmp_path):
    """A q_norm scale doubled in HF layer 7 (entry (1, 1) of the nested local stack) and layer_scalar of HF layer 11
    (entry 1 of the global stack) negated."""
    hf, good = converted("gemma4", True)
    (tmp_path / "short.jsonl").write_text(SHORT)
    tree = restore_tree(good)
    blocks = tree["params"]["params"]["decoder"]["scanned_blocks"]
    qn = blocks["local_layers"]["self_attention"]["query_norm"]
    qn["scale"] = np.array(qn["scale"])
    qn["scale"][:, 1, 1] = qn["scale"][:, 1, 1].astype(np.float32) * 2
    g = blocks["global_layer"]
    g["layer_scalar"] = np.array(g["layer_scalar"])
    g["layer_scalar"][:, 1] = -g["layer_scalar"][:, 1]
    r = verify(maxtext=save_tree(tree, good, tmp_path / "bad"), hf=hf, prompts_file=tmp_path / "short.jsonl")
    assert not r.passed and {f["tensor"] for f in r.data["verdict"]["content"]["failures"]} == {
        "model.layers.7.self_attn.q_norm.weight",
        "model.layers.11.layer_scalar",
    }


def test_configs_the_reference_refuses(tiny_model):
    from converters.verify.reference.common import hf_config_object
    from converters.verify.reference.gemma4 import Gemma4Forward

    cfg = json.loads((tiny_model("gemma4", layers=LAYERS) / "config.json").read_text())
    fwd = Gemma4Forward()
    fwd.make_spec(hf_config_object(cfg))
    rp = cfg["rope_parameters"]
    for changes, reason in (
        ({"hidden_size_per_layer_input": 16}, "per-layer embeddings"),
        ({"enable_moe_block": True, "num_experts": 1, "top_k_experts": 1, "moe_intermediate_size": 8}, "num_experts=1"),
        (
            {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 5, "moe_intermediate_size": 8},
            "top_k_experts=5",
        ),
        ({"rope_parameters": {**rp, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}, "rope_type"),
    ):
        with pytest.raises(UnsupportedModelError, match=reason):
            fwd.make_spec(hf_config_object({**cfg, **changes}))


@SLOW
def test_multimodal_moe_checkpoint_verifies(tmp_path, monkeypatch):
    """The published 26b is multimodal (model_type gemma4, Gemma4ForConditionalGeneration): its MoE text model under
    model.language_model.* with the vision tower converts in both layouts and verifies, the image prompt included
    (float32: see the module docstring)."""
    from converters import tiny_models
    from converters.families.gemma4 import _TINY_MOE

    monkeypatch.setitem(tiny_models.TINY, "gemma4-moe-mm", ("gemma4-26b", _TINY_MOE))
    hf = tiny_models.make_test_model("gemma4-moe-mm", tmp_path / "hf", layers=P, dtype="float32")
    assert json.loads((hf / "config.json").read_text())["text_config"]["enable_moe_block"]
    for scan in (True, False):
        hf_to_maxtext(hf, tmp_path / f"mt-{scan}", scan=scan, dtype="float32")
        r = verify(maxtext=tmp_path / f"mt-{scan}", hf=hf)
        v = r.data["verdict"]
        assert r.passed and v["layout"]["kl_max"] < EXACT_KL, v
        assert "image" in [p["name"] for p in r.data["prompts"]]
