"""Qwen3.5 MoE's vision tower (transformers `Qwen3_5MoeVisionModel`, HF `model.visual.*`): Qwen3-VL's tower rules
(converters/families/qwen3_vl_vision.py) under MaxText 0.2.5's `vision_encoder/Qwen3_5MoeVisionEncoder_0` /
`Qwen3_5MoeVisionProjector_0`, without deepstack mergers, never scanned.

Checked against MaxText 0.2.5 itself (scratch scripts, not run here):
  * its own to_maxtext (param_mapping.py QWEN3_5 mapping and hooks, use_multimodal=true; a numpy loader in place of
    its torch one) on the tiny model in the published layout (4 text layers, fused experts, bf16, the one-block
    tower) gives trees bit-identical to ckptflow's conversion of the same folder: 95/95 arrays (25 of them the
    tower's) scanned and 95/95 unscanned;
  * its abstract trees (use_multimodal=true, nnx.eval_shape at real size) hold exactly `plan`'s paths and shapes:
    qwen3.5-35b-a3b 511 arrays scanned / 1114 unscanned, qwen3.5-397b-a17b 511 / 1449, 441 of them the tower's
    (0.447 B / 0.456 B parameters), no deepstack merger;
  * MaxText's `Qwen3_5MoeVisionEncoder` + `Qwen3_5MoeVisionProjector` loaded with the tiny model's float32 tower as
    ckptflow converts it (scanned and unscanned text layouts: the same 25 arrays), on random pixel patches of an
    8 x 12 grid, vs transformers' `get_image_features`: relative error (Frobenius) 6.7e-7, max 7.3e-7, with HF's exact
    merger GELU and a float32 position table patched in; 1.9e-4 as MaxText computes (tanh-GELU merger, position table
    cast to bfloat16), which ckptflow's JAX reference with maxtext_numerics=True reproduces to 5.0e-7 (4.8e-7 without).
"""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import CkptflowError
from converters.families.qwen3_5 import ENCODER, NO_TOWER, PROJECTOR
from converters.io.orbax import read_params
from tests.families.helpers import bits, hf_tensors, model_cache, round_trip
from tests.families.test_qwen3_vl_vision import _maxtext_tower, maxtext_hooks

FAMILY, LAYERS = "qwen3.5-moe", 4


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """`hf_model(dtype)` -> a tiny random Qwen3_5MoeForConditionalGeneration folder (one cycle of 4 text layers, the
    family's one-block tower)."""
    return model_cache(tmp_path_factory, FAMILY, layers=LAYERS)


def tower(params: dict) -> dict:
    return {k: v for k, v in params.items() if k.startswith("vision_encoder/")}


def layout(src) -> dict:
    """The tower as MaxText's converter lays it out (param_mapping.py QWEN3_5_..._HOOK_FN), in numpy."""
    vision = json.loads((src / "config.json").read_text())["vision_config"]
    return maxtext_hooks(hf_tensors(src), vision, encoder=ENCODER, projector=PROJECTOR)


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(bits(np.ascontiguousarray(a[k])), bits(np.ascontiguousarray(b[k]))), k


def test_stored_tower_is_maxtexts_layout_in_both_text_layouts(hf_model, tmp_path):
    """HF -> MaxText (unscanned, then scanned): the tower's 25 arrays, equal to the numpy layout, the same in both."""
    src = hf_model("float32")
    want = layout(src)
    assert len(want) == 25 and not any("merger_" in k for k in want)  # 3 + 16 (one block) + 6 (projector)
    for scan in (False, True):
        hf_to_maxtext(src, tmp_path / f"mt{scan}", scan=scan, dtype="float32")
        params = read_params(tmp_path / f"mt{scan}")
        assert_same(tower(params), want)
        assert ("decoder/layers/layer_0/input_layernorm/scale" in params) == scan


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_round_trip_is_bit_exact(hf_model, tmp_path, dtype):
    """HF -> MaxText -> HF -> MaxText, every tensor bit-exact (round_trip asserts it), the tower included."""
    params, hf = round_trip(hf_model(dtype), tmp_path, scan=True, dtype=dtype)
    assert any(k.startswith("model.visual.") for k in hf)
    assert len(tower(params)) == 25
    assert params[f"{ENCODER}/patch_embed/proj/kernel"].dtype == (
        np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    )


def _image_prompt(cfg: dict, seed: int = 0):
    """Token ids with one 8 x 12-patch image (24 merged image tokens between vision start / end) and its inputs."""
    v, rng = cfg["vision_config"], np.random.default_rng(seed)
    rows, cols = 8, 12
    img = [cfg["image_token_id"]] * (rows * cols // v["spatial_merge_size"] ** 2)
    ids = [5, 9, 17, cfg["vision_start_token_id"], *img, cfg["vision_end_token_id"], 33, 41, 8, 12, 60]
    width = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    pixels = rng.standard_normal((rows * cols, width)).astype(np.float32)
    types = [[1 if i == cfg["image_token_id"] else 0 for i in ids]]
    return ids, {
        "pixel_values": torch.from_numpy(pixels),
        "image_grid_thw": torch.tensor([[1, rows, cols]]),
        "mm_token_type_ids": torch.tensor(types),
    }


def test_export_gives_transformers_the_same_image_features_and_logits(hf_model, tmp_path):
    """The exported folder (float32) loads as Qwen3_5MoeForConditionalGeneration with every weight, and computes the
    source's image features and logits on a prompt holding an image, bit for bit."""
    from transformers import AutoModelForImageTextToText

    src = hf_model("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and "vision_config" in cfg
    assert NO_TOWER not in cfg
    ids, inputs = _image_prompt(cfg)
    feats, logits = [], []
    for folder in (src, tmp_path / "hf"):
        model, info = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"], info["missing_keys"]
        with torch.no_grad():
            f = model.eval().model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            feats.append(f.pooler_output[0].numpy())
            logits.append(model(input_ids=torch.tensor([ids]), **inputs).logits[0].numpy())
    assert feats[0].shape == (24, 64) and float(feats[0].std()) > 0.1
    assert np.array_equal(feats[0], feats[1])
    assert np.array_equal(logits[0], logits[1])


def test_checkpoint_without_tower_exports_the_language_model(hf_model, tmp_path):
    """A MaxText checkpoint without the tower (MaxText use_multimodal=false: here converted from the text weights of
    a config without vision_config) exported with the multimodal config: a warning, the multimodal config as given,
    the language model's tensors only (transformers initialises the tower)."""
    src = hf_model("bfloat16")
    cfg = json.loads((src / "config.json").read_text())
    text_src = tmp_path / "text"
    text_src.mkdir()
    from converters.io.safetensors import save_file

    save_file(text_src / "model.safetensors", {k: v for k, v in hf_tensors(src).items() if "visual" not in k})
    (text_src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "vision_config"}))
    hf_to_maxtext(text_src, tmp_path / "mt", scan=True)
    assert not tower(read_params(tmp_path / "mt"))
    with pytest.warns(UserWarning, match="no vision tower"):
        maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", hf_config=str(src / "config.json"))
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert out["vision_config"] == cfg["vision_config"] and NO_TOWER not in out
    exported = hf_tensors(tmp_path / "hf")
    assert exported and not any(k.startswith("model.visual.") for k in exported)


# MaxText 0.2.5's own tree (create_nnx_abstract_model, use_multimodal=true, real size): Qwen3-VL's tower without the
# deepstack mergers, E/ = vision_encoder/Qwen3_5MoeVisionEncoder_0/, P/ = vision_encoder/Qwen3_5MoeVisionProjector_0/
MAXTEXT_TOWER = {
    name: {k: v for k, v in _maxtext_tower(1152, 4304, out).items() if not k.startswith("E/merger_")}
    for name, out in (("qwen3.5-35b-a3b", 2048), ("qwen3.5-397b-a17b", 4096))
}


@pytest.mark.parametrize("name", sorted(MAXTEXT_TOWER))
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_real_size_tower_is_maxtexts_tree(name, scan):
    fam, cfg = registry.model(name)
    plan = [leaf for leaf in fam.plan(cfg, scan=scan) if leaf.path.startswith("vision_encoder/")]
    assert len(plan) == 441  # 27 blocks x 16, patch embedding + bias, position table, the projector's 6

    def short(p):
        return re.sub(r"blocks_\d+", "blocks_N", p.replace(ENCODER + "/", "E/").replace(PROJECTOR + "/", "P/"))

    assert {short(leaf.path): leaf.shape for leaf in plan} == MAXTEXT_TOWER[name]
    assert {leaf.path.split("/")[2] for leaf in plan if "/blocks_" in leaf.path} == {f"blocks_{i}" for i in range(27)}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"deepstack_visual_indexes": [0]}, "this tower has no deepstack mergers"),
        ({"out_hidden_size": 40}, "vision out_hidden_size 40 != text hidden_size 2048"),
        ({"num_heads": 5}, "not a multiple of num_heads"),
        ({"num_position_embeddings": 2300}, "not a square grid"),
    ],
)
def test_refused_towers_say_why(change, reason):
    fam, cfg = registry.model("qwen3.5-35b-a3b")
    bad = {**cfg, "vision_config": {**cfg["vision_config"], **change}}
    with pytest.raises(CkptflowError, match="qwen3.5-moe: .*" + re.escape(reason)):
        fam.plan(bad, scan=True)


@pytest.mark.slow
def test_converted_multimodal_checkpoint_verifies(hf_model, tmp_path):
    """verify (the text prompts and an image prompt: tests/verify/test_qwen3_5_vision.py; the tower content-checked
    against the source's model.visual.* tensors) passes on the float32 conversion, scanned: KL 8.9e-12 measured."""
    from converters.verify import verify

    src = hf_model("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    r = verify(maxtext=tmp_path / "mt", hf=src)
    assert r.passed and r.data["summary"]["kl_max"] < 1e-9, r.data["summary"]
    assert r.data["summary"]["content_passed"] and r.data["summary"]["num_prompts"] == 5  # 4 text + the image
    # a source whose tower differs in one tensor: the content check names it
    from converters.io.safetensors import save_file

    tensors = hf_tensors(src)
    tensors["model.visual.blocks.0.attn.qkv.weight"] = tensors["model.visual.blocks.0.attn.qkv.weight"][::-1].copy()
    (tmp_path / "other").mkdir()
    save_file(tmp_path / "other" / "model.safetensors", tensors)
    (tmp_path / "other" / "config.json").write_text((src / "config.json").read_text())
    r = verify(maxtext=tmp_path / "mt", hf=tmp_path / "other")
    assert not r.passed and not r.data["summary"]["content_passed"]
    assert "model.visual.blocks.0.attn.qkv.weight" in json.dumps(r.data)
