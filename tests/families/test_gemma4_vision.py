"""Multimodal Gemma 4 (`model_type: gemma4`, Gemma4ForConditionalGeneration; gemma4-31b's published layout): the
text model under `model.language_model.*`, the vision tower `model.vision_tower.*` and projector
`model.embed_vision.*` under MaxText's `vision_encoder/` (never scanned).

Tiny model `gemma4-mm` (`converters.tiny_models`): the `gemma4` text model (12 layers, hidden 72) around a tower of
2 layers, hidden 32, 2 heads x 16, MLP 48, 4px patches, 16 positions, 2 x 2 pooling (`gemma4_vision.TINY_VISION`).

Tolerance: every tower tensor is only transposed / reshaped: bit-exact both ways. The text model is `gemma4`'s
(test_gemma4.py): bit-exact except the embedding (times sqrt(72) in float32, within 1 ulp after a round trip).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError, UnsupportedModelError
from converters.families.gemma4 import Gemma4
from converters.families.gemma4_vision import ENCODER, PROJECTOR
from converters.io.orbax import read_params
from converters.io.safetensors import SafetensorsFolder
from tests.families.helpers import assert_close, hf_tensors, ulp_distance
from tests.families.test_gemma4 import LAYERS, expected_layer, stored

H, NV, DV, FV, LV, PATCH, POS, E = 32, 2, 16, 48, 2, 4, 16, 72
ROWS, COLS, K = 4, 6, 2  # the test image: 4 x 6 patches of 4px, pooled 2 x 2 into 6 soft tokens
TEXT = "model.language_model."


def expected_tower(hf: dict) -> dict:
    """MaxText's vision_encoder arrays from the HF tensors, with numpy, as MaxText 0.2.5's param_mapping.py GEMMA4 hooks
    lay them out (reshape_kernel: transpose then reshape; reshape_pos_emb: axes 0 and 1 swapped; norms as is)."""
    t = "model.vision_tower."
    out = {
        f"{ENCODER}/vision_entry/input_projection/kernel": hf[t + "patch_embedder.input_proj.weight"].T,
        f"{ENCODER}/vision_entry/pos_emb_param": hf[t + "patch_embedder.position_embedding_table"].transpose(1, 0, 2),
        f"{ENCODER}/std_bias": hf[t + "std_bias"],
        f"{ENCODER}/std_scale": hf[t + "std_scale"],
        f"{PROJECTOR}/projection/kernel": hf["model.embed_vision.embedding_projection.weight"].T,
    }
    for i in range(LV):
        b, m = f"{t}encoder.layers.{i}.", f"{ENCODER}/layer_{i}/"
        out |= {
            m + "pre_attention_norm/scale": hf[b + "input_layernorm.weight"],
            m + "post_attention_norm/scale": hf[b + "post_attention_layernorm.weight"],
            m + "pre_ffw_norm/scale": hf[b + "pre_feedforward_layernorm.weight"],
            m + "post_ffw_norm/scale": hf[b + "post_feedforward_layernorm.weight"],
            m + "attention/query_norm/scale": hf[b + "self_attn.q_norm.weight"],
            m + "attention/key_norm/scale": hf[b + "self_attn.k_norm.weight"],
            m + "attention/query/kernel": hf[b + "self_attn.q_proj.linear.weight"].T.reshape(H, NV, DV),
            m + "attention/key/kernel": hf[b + "self_attn.k_proj.linear.weight"].T.reshape(H, NV, DV),
            m + "attention/value/kernel": hf[b + "self_attn.v_proj.linear.weight"].T.reshape(H, NV, DV),
            m + "attention/out/kernel": hf[b + "self_attn.o_proj.linear.weight"].T.reshape(NV, DV, H),
            m + "mlp/wi_0/kernel": hf[b + "mlp.gate_proj.linear.weight"].T,
            m + "mlp/wi_1/kernel": hf[b + "mlp.up_proj.linear.weight"].T,
            m + "mlp/wo/kernel": hf[b + "mlp.down_proj.linear.weight"].T,
        }
    return out


def text_names(hf: dict) -> dict:
    """The text model's tensors under gemma4_text's names (`model.layers.*`), for test_gemma4's expectations."""
    return {"model." + k[len(TEXT) :]: v for k, v in hf.items() if k.startswith(TEXT)}


@pytest.mark.parametrize("scan", [pytest.param(True, marks=pytest.mark.slow), False], ids=["scanned", "unscanned"])
def test_stored_values_text_and_tower(tiny_model, tmp_path, scan):
    src = tiny_model("gemma4-mm", layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    tower = expected_tower(hf)
    for k, want in tower.items():
        assert params[k].shape == want.shape and ulp_distance(params[k], want) == 0, k
    text = text_names(hf)
    table = text["model.embed_tokens.weight"]
    want = (table.astype(np.float32) * np.float32(math.sqrt(E))).astype(table.dtype)
    assert ulp_distance(params["token_embedder/embedding"], want) == 0
    assert ulp_distance(params["decoder/decoder_norm/scale"], text["model.norm.weight"]) == 0
    for i in range(LAYERS):
        for rel, want in expected_layer(text, i, True).items():
            assert ulp_distance(stored(params, rel, i, scan), want) == 0, (rel, i)
    assert sum(not k.startswith("vision_encoder/") for k in params) == (29 if scan else 2 + 10 * 14 + 2 * 13)
    assert sum(k.startswith("vision_encoder/") for k in params) == len(tower) == 5 + LV * 13


@pytest.mark.slow
def test_restores_with_plain_orbax_as_maxtexts_multimodal_tree(tiny_model, tmp_path):
    import orbax.checkpoint as ocp

    hf_to_maxtext(tiny_model("gemma4-mm", layers=LAYERS), tmp_path / "mt", scan=True)
    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())["params"]["params"]
    assert set(tree) == {"token_embedder", "decoder", "vision_encoder"}  # use_multimodal=true adds vision_encoder
    assert set(tree["vision_encoder"]) == {"Gemma4VisionEncoderLayer_0", "Gemma4VisionProjector_0"}
    enc = tree["vision_encoder"]["Gemma4VisionEncoderLayer_0"]
    assert set(enc) == {"vision_entry", "layer_0", "layer_1", "std_bias", "std_scale"}
    assert set(enc["layer_0"]["attention"]) == {"query", "key", "value", "out", "query_norm", "key_norm"}


@pytest.mark.parametrize(
    "scan,dtype",
    [
        (True, "bfloat16"),
        pytest.param(False, "bfloat16", marks=pytest.mark.slow),
        pytest.param(True, "float32", marks=pytest.mark.slow),
        pytest.param(False, "float32", marks=pytest.mark.slow),
    ],
    ids=["scanned-bf16", "unscanned-bf16", "scanned-f32", "unscanned-f32"],
)
def test_round_trips_bit_exact_but_the_embedding(tiny_model, tmp_path, scan, dtype):
    src = tiny_model("gemma4-mm", layers=LAYERS, dtype=dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)  # HF -> MaxText
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)  # MaxText -> HF
    first, back = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert sorted(first) == sorted(back)  # the published names, tower and projector included
    assert assert_close(first, back, "embed_tokens.weight") == 1  # sqrt(72) is no power of two
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)  # MaxText -> HF -> MaxText
    assert_close(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"), "token_embedder/embedding")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"] and cfg["model_type"] == "gemma4"


def image_inputs(cfg: dict, seed: int = 0):
    """A prompt with one 16 x 24 px image (4 x 6 patches -> 6 soft tokens) between text tokens, as transformers'
    Gemma4 processor feeds it: patches flattened (row, column, channel), positions (x, y), the image tokens marked in
    mm_token_type_ids (bidirectional attention among them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.rand(ROWS * PATCH, COLS * PATCH, 3, generator=g)
    patches = img.reshape(ROWS, PATCH, COLS, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(1, ROWS * COLS, -1)
    y, x = torch.meshgrid(torch.arange(ROWS), torch.arange(COLS), indexing="ij")
    positions = torch.stack([x, y], -1).reshape(1, ROWS * COLS, 2)
    n = ROWS * COLS // K**2
    ids = [1, 5, 77, cfg["boi_token_id"], *[cfg["image_token_id"]] * n, cfg["eoi_token_id"], 300, 12, 99, 3, 8, 250]
    types = [1 if t == cfg["image_token_id"] else 0 for t in ids]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": patches,
        "image_position_ids": positions,
        "mm_token_type_ids": torch.tensor([types]),
    }


def test_exported_folder_loads_in_transformers_with_an_image(tiny_model, tmp_path):
    """Gemma4ForConditionalGeneration from the export computes the source's logits on an image prompt (tower,
    projector, bidirectional attention over the image tokens) to float32 noise (the embedding within 1 ulp)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    src = tiny_model("gemma4-mm", layers=LAYERS, dtype="float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(b) is type(a) and b.vision_config.to_dict() == a.vision_config.to_dict()
    assert b.image_token_id == a.image_token_id and b.text_config.layer_types == a.text_config.layer_types
    inputs = image_inputs(json.loads((src / "config.json").read_text()))
    with torch.no_grad():
        want = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)(**inputs).logits
        got = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)(**inputs).logits
        blind = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)(
            **{**inputs, "pixel_values": inputs["pixel_values"].flip(1)}
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (blind - want).abs().max() > 1e-2  # the image does reach the logits


@pytest.mark.slow
def test_checkpoint_without_tower_exports_the_text_model(tiny_model, tmp_path):
    """MaxText's default use_multimodal=false checkpoint (no vision_encoder) with the published multimodal config
    exports as Gemma4ForCausalLM, computing the same text logits."""
    import orbax.checkpoint as ocp
    import torch
    from transformers import AutoModelForCausalLM

    from tests.families.helpers import IDS

    src = tiny_model("gemma4-mm", layers=LAYERS, dtype="float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())
    del tree["params"]["params"]["vision_encoder"]
    tree.pop("opt_state", None)
    ocp.PyTreeCheckpointer().save((tmp_path / "text" / "0" / "items").absolute(), tree)
    with pytest.warns(UserWarning, match="no vision tower"):
        maxtext_to_hf(tmp_path / "text", tmp_path / "hf", hf_config=str(src / "config.json"), dtype="float32")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and cfg["architectures"] == ["Gemma4ForCausalLM"]
    assert sorted(SafetensorsFolder(tmp_path / "hf").tensors) == sorted(text_names(hf_tensors(src)))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_multimodal_config_without_tower_is_the_text_model_renamed(tiny_model):
    cfg = json.loads((tiny_model("gemma4-mm", layers=LAYERS) / "config.json").read_text())
    text_only = {**cfg, "vision_config": None}
    leaves = Gemma4.plan(text_only, scan=True)
    assert not any(l.path.startswith("vision_encoder/") for l in leaves)
    assert {l.hf_name(0) for l in leaves if l.path == "token_embedder/embedding"} == {TEXT + "embed_tokens.weight"}
    plain = Gemma4.plan(cfg["text_config"] | {"model_type": "gemma4_text"}, scan=True)
    assert [l.path for l in leaves] == [l.path for l in plain]


def test_refused_configs(tiny_model):
    cfg = json.loads((tiny_model("gemma4-mm", layers=LAYERS) / "config.json").read_text())
    assert registry.family_for_config(cfg) is Gemma4
    Gemma4.plan(cfg, scan=True)
    v = cfg["vision_config"]
    refused = [
        ({"vision_config": {**v, "use_clipped_linears": True}}, MappingError, "clipped"),
        ({"vision_config": {**v, "standardize": False}}, MappingError, "standardize"),
        ({"vision_config": {**v, "num_key_value_heads": 1}}, MappingError, "kv heads"),
        ({"vision_config": {**v, "head_dim": 8}}, MappingError, "head_dim"),
        ({"audio_config": {"hidden_size": 8}}, UnsupportedModelError, "audio"),
        ({"text_config": {**cfg["text_config"], "hidden_size_per_layer_input": 256}}, UnsupportedModelError, "e2b"),
    ]
    for change, error, match in refused:
        with pytest.raises(error, match=match):
            Gemma4.plan({**cfg, **change}, scan=False)
