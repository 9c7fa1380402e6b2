"""verify's image prompt on multimodal Llama 4 (converters/verify/reference/llama4_vision.py: the tower + projector in
JAX, the projected features at the image tokens, then Llama 4's text reference), on the tiny `llama4-mm` (Maverick's
path, a two-block tower of 32 (2 heads x 16), 56px images of 14px patches, pixel shuffle 0.5 -> 4 image tokens).

1. On the tower laid out by numpy (tests/families/test_llama4_vision.py's `expected_tower`, not the converter), the
   reference reproduces transformers' `get_image_features` (and the projector) in float32: measured 5.7e-7 relative
   to the largest value (projected 6.5e-7); bound 1e-5. Wrong layouts move it by > 100x the bound: q/k/v heads
   interleaved (0.53), patch columns in (row, column, channel) order (0.90), adapter fc1 reshaped instead of
   transposed (1.14), the class token's position row first (0.080).
2. A converted float32 checkpoint verifies with the image prompt (BOS, text, <|image_start|>, 4 x <|patch|>
   (image_token_index), <|image_end|>, text): layout KL 6.1e-14 on the image prompt, 8.2e-13 on the text prompts
   (tests/verify/test_llama4.py's multimodal test runs it by default, scanned and unscanned).
3. Written with a wrong tower rule that its inverse undoes (content passes), the image prompt fails layout by > 100x
   its threshold (1e-5) and the text prompts pass (slow): q/k/v heads interleaved 5.1e-3, patch columns
   (row, column, channel) 1.7e-2, adapter fc1 reshaped instead of transposed 2.7e-2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from converters.core.transforms import Permute, Reshape
from converters.families import llama4_vision as tower
from converters.verify import verify
from converters.verify.reference import llama4_vision as ref
from tests.families.helpers import hf_tensors, model_cache
from tests.families.test_llama4_vision import expected_tower

BOUND = 1e-5
EXACT_KL = 1e-9
H, N, D, C, P, F, A = 32, 2, 16, 3, 14, 128, 48


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4-mm", 4)


@pytest.fixture(scope="module")
def hf_features(mm):
    """The float32 folder, its HF tensors, two tiles (the test image and noise) and transformers' features of them."""
    import torch
    from transformers import AutoModelForImageTextToText

    src = mm("float32")
    m = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    px = np.stack([ref.test_image(56), np.random.default_rng(0).standard_normal((C, 56, 56)).astype(np.float32)])
    with torch.no_grad():
        feats = m.get_image_features(torch.from_numpy(px)).last_hidden_state
        proj = m.multi_modal_projector(feats)
    return src, hf_tensors(src), ref.vision_spec(m.config.vision_config), px, feats.numpy(), proj.numpy()


def relative_error(v, mt: dict, px, feats, proj) -> float:
    err = 0.0
    for i in range(len(px)):
        got = np.asarray(ref.jitted("image_features")(v, mt, px[i]))
        got_p = np.asarray(ref.jitted()(v, mt, px[i]))
        err = max(err, np.abs(got - feats[i]).max() / np.abs(feats[i]).max())
        err = max(err, np.abs(got_p - proj[i]).max() / np.abs(proj[i]).max())
    return float(err)


def test_reference_features_match_transformers(hf_features):
    _, hf, v, px, feats, proj = hf_features
    assert feats.shape == (2, 4, A) and proj.shape == (2, 4, 64)
    err = relative_error(v, expected_tower(hf), px, feats, proj)
    print("image features relative error", err)
    assert err < BOUND


def _numpy_mistakes(mt: dict, mistake: str) -> dict:
    mt = dict(mt)
    if mistake == "q/k/v heads interleaved":
        for i in range(2):
            for k in ("query", "key", "value"):
                key = f"{tower.ENCODER}/layers_{i}/self_attention_vision/{k}/"
                mt[key + "kernel"] = mt[key + "kernel"].reshape(H, D, N).transpose(0, 2, 1)
                mt[key + "bias"] = mt[key + "bias"].reshape(D, N).T
    elif mistake == "patch columns (row, col, channel)":
        key = tower.MODEL + "/Llama4UnfoldConvolution_0/vit_unfold_linear/kernel"
        mt[key] = mt[key].reshape(C, P, P, H).transpose(1, 2, 0, 3).reshape(C * P * P, H)
    elif mistake == "adapter fc1 not transposed":
        key = ref.ADAPTER + "fc1/kernel"
        mt[key] = mt[key].T.reshape(F, A)
    elif mistake == "class token position first":
        key = tower.MODEL + "/positional_embedding_vlm"
        mt[key] = np.roll(mt[key], 1, axis=0)
    return mt


NUMPY_MISTAKES = [
    "q/k/v heads interleaved",
    "patch columns (row, col, channel)",
    "adapter fc1 not transposed",
    "class token position first",
]


@pytest.mark.parametrize("mistake", NUMPY_MISTAKES)
def test_a_wrong_tower_layout_moves_the_features(hf_features, mistake):
    _, hf, v, px, feats, proj = hf_features
    err = relative_error(v, _numpy_mistakes(expected_tower(hf), mistake), px, feats, proj)
    print(mistake, "relative error", err)
    assert err > 100 * BOUND


def test_image_prompt_layout(mm):
    """One tile: <|image_start|>, (56 / 14)^2 * 0.5^2 = 4 <|patch|> tokens (image_token_index), <|image_end|>."""
    import json

    config = json.loads((mm("float32") / "config.json").read_text())
    ids, inputs = ref.image_prompt(config)
    boi, eoi, image = config["boi_token_index"], config["eoi_token_index"], config["image_token_index"]
    at = ids.index(boi)
    assert ids[at : at + 6] == [boi] + [image] * 4 + [eoi] and ids.count(image) == 4
    assert ids.count(boi) == ids.count(eoi) == 1 and ids[0] == 1
    assert inputs["pixel_values"].shape == (1, C, 56, 56)
    assert ref.image_prompt({**config, "model_type": "llama4_text"}) is None


# ---------------------------------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def converted(mm, tmp_path_factory):
    from converters.convert import hf_to_maxtext

    src = mm("float32")
    out = tmp_path_factory.mktemp("llama4-mm-mt") / "mt"
    hf_to_maxtext(src, out, scan=False, dtype="float32")
    return src, out


def _prompts(r, comparison: str = "layout") -> dict:
    return {p["name"]: p["comparisons"][comparison] for p in r.data["prompts"]}


@pytest.mark.slow
def test_verify_runs_the_image_prompt(converted):
    hf, mt = converted
    r = verify(maxtext=mt, hf=hf, dtype="float32")
    assert r.passed, r.data["summary"]
    layout = _prompts(r)
    print("image prompt layout KL", layout["image"]["kl_max"], "all", max(p["kl_max"] for p in layout.values()))
    assert layout["image"]["passed"] and layout["image"]["kl_max"] < EXACT_KL, layout["image"]
    assert all(p["kl_max"] < EXACT_KL for p in layout.values())
    assert any("image_token_index=511" in w for w in r.data["warnings"])  # MaxText merges at 200092


WRONG = {
    # q, k and v (weights and biases) split into heads with the head index fastest (channel c -> head c % N)
    "q/k/v heads interleaved": (
        tuple(f"{p}_proj.weight" for p in "qkv"),
        {"chain": (Reshape((D, N, H), (N * D, H)), Permute((2, 1, 0)))},
        tuple(f"{p}_proj.bias" for p in "qkv"),
        {"chain": (Reshape((D, N), (N * D,)), Permute((1, 0)))},
    ),
    # the unfold columns read as (patch row, patch column, channel) instead of (channel, row, column)
    "patch columns (row, col, channel)": (
        ("patch_embedding.linear.weight",),
        {
            "chain": (
                Reshape((H, C, P, P), (H, C * P * P)),
                Permute((0, 2, 3, 1)),
                Reshape((H, C * P * P), (H, P, P, C)),
                Permute((1, 0)),
            )
        },  # fmt: skip
    ),
    # the adapter's fc1 weight reshaped into the kernel's shape instead of transposed
    "adapter fc1 not transposed": (("vision_adapter.mlp.fc1.weight",), {"chain": (Reshape((F, A), (A, F)),)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_a_wrong_tower_mapping_fails_the_image_prompt(converted, tmp_path, monkeypatch, mistake):
    """Written and read back with the same wrong rule: content passes (the inverse undoes it), the image prompt fails
    layout by > 100x its threshold, the text prompts pass."""
    from converters.convert import hf_to_maxtext

    hf, _ = converted
    layer_rules, global_rules = tower.layer_rules, tower.global_rules
    parts = WRONG[mistake]
    for names, change in zip(parts[::2], parts[1::2]):
        for name in names:
            layer_rules, global_rules = _broken_from(layer_rules, global_rules, name, change)
    monkeypatch.setattr(tower, "layer_rules", layer_rules)
    monkeypatch.setattr(tower, "global_rules", global_rules)
    hf_to_maxtext(hf, tmp_path / "mt", scan=False, dtype="float32")
    r = verify(maxtext=tmp_path / "mt", hf=hf, dtype="float32")
    layout = _prompts(r)
    print(mistake, "image prompt layout KL", layout["image"]["kl_max"])
    assert r.data["verdict"]["content"]["passed"], r.data["verdict"]
    threshold = r.data["verdict"]["layout"]["max_kl"]
    assert not r.passed and not r.data["verdict"]["layout"]["passed"]
    assert layout["image"]["kl_max"] > 100 * threshold, layout["image"]
    assert all(p["passed"] for name, p in layout.items() if name != "image"), layout


def _broken_from(layer_rules, global_rules, name: str, change: dict):
    def fix(rs):
        return [dataclasses.replace(r, **change) if r.hf.endswith(name) else r for r in rs]

    return (lambda v: fix(layer_rules(v))), (lambda v: fix(global_rules(v)))
