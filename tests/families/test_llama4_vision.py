"""Llama 4's vision tower (converters/families/llama4_vision.py) inside the multimodal checkpoint (`llama4-mm`:
Maverick's path, a two-block tower of 32 (2 heads x 16), 56px images of 14px patches, pixel shuffle 0.5 -> 4 tokens
of 128, adapter 128 -> 48 -> 48, projector 48 -> 64): stored values against a plain-numpy layout, bit-exact round trips,
the exported folder's image features, MaxText's real-size tree, and the configs it refuses.

Measured against MaxText 0.2.5 itself (its own modules in its own venv, not run here):
  * its abstract tree with use_multimodal=true (nnx.eval_shape of llama4-17b-16e and -128e, scanned and unscanned)
    equals ckptflow's plan path for path and shape: 609 / 1181 arrays (16e), 601 / 1085 (128e), 554 of them the
    tower (0.87 B parameters: 108.64 B and 401.58 B in all);
  * the tiny model converted in float32 (scanned and unscanned), restored by model_creation_utils.from_pretrained
    (all 89 parameters from the checkpoint, shapes equal), its `Llama4VisionModel_0` and the whole `vision_encoder`
    (tower + projector) on random pixels [2, 3, 56, 56] vs transformers' `get_image_features` and
    `multi_modal_projector`: relative error 4.7e-7 / 4.9e-7 (max abs 4.8e-7 / 2.1e-7), float32 rounding.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError
from converters.families import llama4_vision as tower
from converters.families.llama4 import Llama4
from converters.io.orbax import read_params
from converters.tiny_models import tiny_config
from tests.families.helpers import bits, hf_tensors, model_cache, round_trip

H, NH, HD, F, A, OUT, TEXT_E, BLOCKS = 32, 2, 16, 128, 48, 48, 64, 2
M, P = tower.MODEL + "/", tower.PROJECTOR + "/"


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4-mm", 4)


def expected_tower(hf: dict) -> dict:
    """MaxText's tower arrays from the HF tensors, in plain numpy (Linear weights transposed, q/k/v split into
    heads, nothing permuted)."""
    v, s = "vision_model.", M + "Llama4VisionPixelShuffleMLP_0/pixel_shuffle_mlp/"
    out = {
        M + "Llama4UnfoldConvolution_0/vit_unfold_linear/kernel": hf[v + "patch_embedding.linear.weight"].T,
        M + "class_embedding": hf[v + "class_embedding"],
        M + "positional_embedding_vlm": hf[v + "positional_embedding_vlm"],
        s + "vit_pixel_shuffle_mlp_fc1/kernel": hf[v + "vision_adapter.mlp.fc1.weight"].T,
        s + "vit_pixel_shuffle_mlp_fc2/kernel": hf[v + "vision_adapter.mlp.fc2.weight"].T,
        P + "vit_multi_modal_projector/kernel": hf["multi_modal_projector.linear_1.weight"].T,
    }
    for n in ("layernorm_pre", "layernorm_post"):
        out |= {M + f"{n}/scale": hf[v + f"{n}.weight"], M + f"{n}/bias": hf[v + f"{n}.bias"]}
    for i in range(BLOCKS):
        b, e = f"{v}model.layers.{i}.", f"{tower.ENCODER}/layers_{i}/"
        for n, m in (
            ("input_layernorm", "input_layer_norm"),
            ("post_attention_layernorm", "post_attention_layer_norm"),
        ):
            out |= {e + f"{m}/scale": hf[b + f"{n}.weight"], e + f"{m}/bias": hf[b + f"{n}.bias"]}
        for n, m in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            out[e + f"self_attention_vision/{m}/kernel"] = hf[b + f"self_attn.{n}.weight"].T.reshape(H, NH, HD)
            out[e + f"self_attention_vision/{m}/bias"] = hf[b + f"self_attn.{n}.bias"].reshape(NH, HD)
        out[e + "self_attention_vision/out/kernel"] = hf[b + "self_attn.o_proj.weight"].T.reshape(NH, HD, H)
        out[e + "self_attention_vision/out/bias"] = hf[b + "self_attn.o_proj.bias"]
        for k in ("fc1", "fc2"):
            out[e + f"Llama4VisionMLP_0/vit_encoder_layer_mlp_{k}/kernel"] = hf[b + f"mlp.{k}.weight"].T
            out[e + f"Llama4VisionMLP_0/vit_encoder_layer_mlp_{k}/bias"] = hf[b + f"mlp.{k}.bias"]
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_tower_is_the_numpy_layout(mm, tmp_path, scan):
    src = mm()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    want = expected_tower(hf)
    got = {k: v for k, v in params.items() if k.startswith("vision_encoder/")}
    assert sorted(got) == sorted(want)  # the tower is never scanned: layers_<i> either way
    assert len(got) == 10 + 16 * BLOCKS == len([k for k in hf if k.startswith(("vision_model.", "multi_modal_"))])
    assert [k for k in got if not np.array_equal(bits(got[k]), bits(want[k]))] == []
    assert got[M + "positional_embedding_vlm"].shape == (4 * 4 + 1, H)
    assert got[P + "vit_multi_modal_projector/kernel"].shape == (OUT, TEXT_E)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_are_bit_exact(mm, tmp_path, scan, dtype):
    params, first = round_trip(mm(dtype), tmp_path, scan=scan, dtype=dtype)  # every tensor, the tower's too
    assert any(k.startswith("vision_model.model.layers.1.") for k in first)
    assert sum(k.startswith("vision_encoder/") for k in params) == 42


def test_exported_folder_gives_identical_image_features(mm, tmp_path):
    """float32 folder -> MaxText -> HF: transformers loads it as Llama4ForConditionalGeneration with the source's
    image features (vision model + projector) on random pixels, bit for bit."""
    import torch
    from transformers import AutoModelForImageTextToText

    src = mm("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"] and cfg["vision_config"]["hidden_size"] == H
    px = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 3, 56, 56)).astype(np.float32))
    out = []
    for f in (src, tmp_path / "hf"):
        m = AutoModelForImageTextToText.from_pretrained(f, dtype=torch.float32).eval()
        with torch.no_grad():
            feats = m.get_image_features(px).last_hidden_state
            out.append((feats, m.multi_modal_projector(feats)))
    (want, want_p), (got, got_p) = out
    assert want.shape == (2, 4, OUT) and want_p.shape == (2, 4, TEXT_E)
    assert want.abs().max() > 0 and torch.equal(got, want) and torch.equal(got_p, want_p)


def maxtext_tower(text_emb: int) -> dict:
    """The 554 vision_encoder arrays of MaxText 0.2.5's llama4 tree with use_multimodal=true (nnx.eval_shape of
    llama4-17b-16e / -128e): 34 unscanned layers of 1408 (16 heads x 88, MLP 5632), 14px patches (588 inputs),
    577 positions, adapter 5632 -> 4096 -> 4096, projector [4096, text_emb]."""
    e = tower.ENCODER + "/"
    out = {
        M + "Llama4UnfoldConvolution_0/vit_unfold_linear/kernel": (588, 1408),
        M + "class_embedding": (1408,),
        M + "positional_embedding_vlm": (577, 1408),
        M + "Llama4VisionPixelShuffleMLP_0/pixel_shuffle_mlp/vit_pixel_shuffle_mlp_fc1/kernel": (5632, 4096),
        M + "Llama4VisionPixelShuffleMLP_0/pixel_shuffle_mlp/vit_pixel_shuffle_mlp_fc2/kernel": (4096, 4096),
        P + "vit_multi_modal_projector/kernel": (4096, text_emb),
    }
    out |= {M + f"{n}/{w}": (1408,) for n in ("layernorm_pre", "layernorm_post") for w in ("scale", "bias")}
    for i in range(34):
        b = f"{e}layers_{i}/"
        out |= {
            b + f"{n}/{w}": (1408,)
            for n in ("input_layer_norm", "post_attention_layer_norm")
            for w in ("scale", "bias")
        }
        out |= {b + f"self_attention_vision/{k}/kernel": (1408, 16, 88) for k in ("query", "key", "value")}
        out |= {b + f"self_attention_vision/{k}/bias": (16, 88) for k in ("query", "key", "value")}
        out |= {b + "self_attention_vision/out/kernel": (16, 88, 1408), b + "self_attention_vision/out/bias": (1408,)}
        m = b + "Llama4VisionMLP_0/vit_encoder_layer_mlp_"
        out |= {
            m + "fc1/kernel": (1408, 5632),
            m + "fc1/bias": (5632,),
            m + "fc2/kernel": (5632, 1408),
            m + "fc2/bias": (1408,),
        }
    return out


# MaxText 0.2.5's whole tree with use_multimodal=true: (scanned, unscanned) arrays, billions of parameters
REAL = {"llama4-17b-16e": ((609, 1181), 108.64), "llama4-17b-128e": ((601, 1085), 401.58)}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_tower_is_maxtexts_tree(name):
    family, cfg = registry.model(name)
    want = maxtext_tower(5120)
    assert len(want) == 554
    counts = []
    for scan in (True, False):
        plan = {l.path: l.shape for l in family.plan(cfg, scan)}
        assert {k: v for k, v in plan.items() if k.startswith("vision_encoder/")} == want
        assert round(sum(map(math.prod, plan.values())) / 1e9, 2) == REAL[name][1]
        counts.append(len(plan))
    assert tuple(counts) == REAL[name][0]
    assert round(sum(map(math.prod, want.values())) / 1e9, 2) == 0.87


def test_tower_configs_maxtext_cannot_express_are_refused():
    cfg = tiny_config("llama4-mm", layers=4)
    v = cfg["vision_config"]
    for change, match in (
        ({"multi_modal_projector_bias": True}, "projector bias"),
        ({"num_attention_heads": 3}, "head_dim"),
        ({"hidden_size": 20, "intermediate_size": 80}, "head_dim"),  # 2 heads of 10: 5 pairs, no x / y halves
        ({"intermediate_size": 96}, "pixel-shuffled"),
        ({"pixel_shuffle_ratio": 0.25}, "pixel-shuffled"),
        ({"projector_output_dim": 64, "vision_output_dim": 64}, "projector_input_dim != projector_output_dim"),
        ({"vision_output_dim": 64}, "vision_output_dim != projector_output_dim"),
        ({"num_hidden_layers": 0}, "positive integer"),
    ):
        with pytest.raises(MappingError, match=match):
            Llama4.dims({**cfg, "vision_config": {**v, **change}})
    assert Llama4.dims(cfg).extra["vision"]["layers"] == BLOCKS
    # a text model has no tower
    assert Llama4.dims(tiny_config("llama4", layers=4)).extra["vision"] is None
