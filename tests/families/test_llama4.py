"""Llama 4 text model: 4-layer scanned blocks, dense and MoE layers interleaved, fused experts split and joined.

Tiny models (`converters.tiny_models.TINY["llama4"]`, Scout's path: every layer MoE; `["llama4-interleaved"]`,
Maverick's path: dense, MoE, dense, MoE): 4 heads x head_dim 32 != hidden 64, 4 experts, top-1, 4 layers (the
4th without RoPE). Every transform only moves elements: round trips are bit-exact. Stored values are compared
with a plain-numpy layout of the HF tensors (gate_up_proj's first half -> wi_0, second -> wi_1, no transpose;
down_proj as is; router and Linear weights transposed; no RoPE permutation, no query scale -- the layout
MaxText's standalone_scripts/llama4_ckpt_unscanned.py writes for scale_query=False).

The multimodal checkpoint (`["llama4-mm"]`: Llama4ForConditionalGeneration around Maverick's path, a two-block vision
tower; the published repos' and transformers 5's key names, `language_model.model.*`, `language_model.lm_head.weight`,
`vision_model.*`, `multi_modal_projector.*`) converts its language model to the arrays of its text twin (the same
language-model tensors saved as a Llama4ForCausalLM folder) bit for bit, and its tower to `vision_encoder/...`
(tests/families/test_llama4_vision.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError, UnsupportedModelError
from converters.families.llama4 import LLAMA4_MAVERICK, LLAMA4_SCOUT, TEXT, Llama4, multimodal
from converters.io.orbax import read_params
from converters.tiny_models import tiny_config
from tests.families.helpers import assert_bit_exact, bits, exported_logits, hf_tensors, model_cache, round_trip

LAYERS, EXPERTS = 4, 4
E, N, KV, D, F, FD = 64, 4, 2, 32, 48, 96
MOE = "Llama4MoEBlock_0"


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4", LAYERS)


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4-interleaved", LAYERS)


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4-mm", LAYERS)


def text_twin(src, out):
    """The language model of multimodal folder `src` saved as a Llama4ForCausalLM folder (same tensors, bytes as
    stored), with `text_config` as its config."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg["text_config"], "architectures": ["Llama4ForCausalLM"]}))
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update({k[len(TEXT) :]: v for k, v in load_file(f).items() if k.startswith(TEXT)})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def expected_layer(hf: dict, i: int, moe: bool) -> dict:
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "feed_forward."
    out = {
        "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        "self_attention/query/kernel": hf[a + "q_proj.weight"].T.reshape(E, N, D),
        "self_attention/key/kernel": hf[a + "k_proj.weight"].T.reshape(E, KV, D),
        "self_attention/value/kernel": hf[a + "v_proj.weight"].T.reshape(E, KV, D),
        "self_attention/out/kernel": hf[a + "o_proj.weight"].T.reshape(N, D, E),
    }
    if not moe:
        for hf_name, mt in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
            out[f"mlp/{mt}/kernel"] = hf[m + hf_name + ".weight"].T
        return out
    gate_up = hf[m + "experts.gate_up_proj"]  # [X, emb, 2F]
    out.update(
        {
            f"{MOE}/MoeBlock_0/gate/kernel": hf[m + "router.weight"].T,
            f"{MOE}/MoeBlock_0/wi_0": gate_up[..., :F],
            f"{MOE}/MoeBlock_0/wi_1": gate_up[..., F:],
            f"{MOE}/MoeBlock_0/wo": hf[m + "experts.down_proj"],
        }
    )
    for hf_name, mt in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
        out[f"{MOE}/shared_experts/{mt}/kernel"] = hf[m + "shared_expert." + hf_name + ".weight"].T
    return out


def stored(params: dict, rel: str, i: int, scan: bool) -> np.ndarray:
    return (
        np.take(params[f"decoder/layers/layers_{i % 4}/{rel}"], i // 4, axis=1)
        if scan
        else params[f"decoder/layers_{i}/{rel}"]
    )


def mismatches(params: dict, hf: dict, scan: bool, step: int) -> list:
    return [
        (rel, i)
        for i in range(LAYERS)
        for rel, want in expected_layer(hf, i, (i + 1) % step == 0).items()
        if not np.array_equal(bits(stored(params, rel, i, scan)), bits(want))
    ]


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("which", ["scout", "maverick"])
def test_stored_values_at_every_layer(request, tmp_path, which, scan):
    src = request.getfixturevalue(which)()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    step = 1 if which == "scout" else 2
    if scan:
        assert not any(k.startswith("decoder/layers_") for k in params)
        assert params[f"decoder/layers/layers_3/{MOE}/MoeBlock_0/wi_0"].shape == (EXPERTS, 1, E, F)
        if step == 2:
            assert params["decoder/layers/layers_0/mlp/wi_0/kernel"].shape == (E, 1, FD)
            assert not any(k.startswith(f"decoder/layers/layers_2/{MOE}") for k in params)
    assert mismatches(params, hf, scan, step) == []
    assert np.array_equal(bits(params["decoder/logits_dense/kernel"]), bits(hf["lm_head.weight"].T))
    assert len([k for k in hf if k.startswith("model.layers.")]) == sum(
        len(expected_layer(hf, i, (i + 1) % step == 0)) - ((i + 1) % step == 0) for i in range(LAYERS)
    )  # every HF layer tensor is accounted for (gate_up_proj fills wi_0 and wi_1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_are_bit_exact(maverick, tmp_path, scan, dtype):
    round_trip(maverick(dtype), tmp_path, scan=scan, dtype=dtype)  # asserts both HF folders and checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_scout_round_trips_are_bit_exact(scout, tmp_path, scan):
    round_trip(scout(), tmp_path, scan=scan)


@pytest.mark.parametrize("which", ["scout", "maverick"])
def test_exported_folder_loads_in_transformers_with_same_logits(request, tmp_path, which):
    import torch

    src = request.getfixturevalue(which)("float32")
    # 70 tokens: past the tiny 32-token attention chunk
    want, got = exported_logits(src, tmp_path, [list(range(3, 73))], scan=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["model_type"] == "llama4_text"
    assert cfg["attention_chunk_size"] == 32 and cfg["no_rope_layers"] == [1, 1, 1, 0]
    assert torch.equal(got, want)


def test_published_configs_are_maxtexts_ymls():
    # configs/models/llama4-17b-16e.yml / -128e.yml (MaxText 0.2.5)
    for cfg, experts, step, qk, mlp_dense in (
        (LLAMA4_SCOUT, 16, 1, True, 16384),
        (LLAMA4_MAVERICK, 128, 2, False, 16384),
    ):
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (5120, 48, 40)
        assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (8, 128, 202048)
        assert (cfg["intermediate_size"], cfg["intermediate_size_mlp"]) == (8192, mlp_dense)
        assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["interleave_moe_layer_step"]) == (
            experts,
            1,
            step,
        )
        assert cfg["use_qk_norm"] is qk and cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-5
        assert cfg["attention_chunk_size"] == 8192 and not cfg["tie_word_embeddings"]
        assert cfg["no_rope_layers"][:4] == [1, 1, 1, 0]
    # 16e: rope_use_scale (base.yml default true) = llama3 scaling; 128e: rope_use_scale false
    assert LLAMA4_SCOUT["rope_scaling"]["rope_type"] == "llama3" and LLAMA4_MAVERICK["rope_scaling"] is None


def test_multimodal_folder_holds_the_published_key_names(mm):
    names = set(hf_tensors(mm()))
    cfg = json.loads((mm() / "config.json").read_text())
    assert cfg["model_type"] == "llama4" and cfg["architectures"] == ["Llama4ForConditionalGeneration"]
    assert {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight"} <= names
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in names
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_model", "multi_modal_projector"}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_multimodal_converts_to_its_text_twins_arrays(mm, tmp_path, scan):
    src = mm()
    twin = text_twin(src, tmp_path / "twin")
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    hf_to_maxtext(twin, tmp_path / "mt-twin", scan=scan)
    params, want = read_params(tmp_path / "mt"), read_params(tmp_path / "mt-twin")
    assert len(want) == 47  # 4 layers (2 dense, 2 MoE) + embedding, final norm, logits kernel
    assert len(params) == 47 + 42  # and the tower's: 10 + 2 blocks of 16
    assert_bit_exact({k: v for k, v in params.items() if not k.startswith("vision_encoder/")}, want)
    # and the arrays are the text model's layout (not merely equal to another run of the same rules)
    assert mismatches(params, hf_tensors(twin), scan, step=2) == []


def test_multimodal_round_trip_and_exports(mm, tmp_path):
    """Multimodal folder -> MaxText -> HF: its own layout (Llama4ForConditionalGeneration, every tensor bit for bit,
    the tower's too); back to MaxText bit-exact; the text twin's checkpoint (no tower, MaxText use_multimodal=false)
    given the multimodal config exports as the text model (Llama4ForCausalLM, with a warning), and the multimodal
    checkpoint given the text config is refused (its tower has no place); transformers loads both exports with the
    source's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    src = mm("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    source, back = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert_bit_exact(source, back)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"] and cfg["model_type"] == "llama4"
    assert cfg["text_config"]["dtype"] == "float32" and cfg["text_config"]["no_rope_layers"] == [1, 1, 1, 0]
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=True, dtype="float32")
    assert_bit_exact(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"))

    twin = text_twin(src, tmp_path / "twin")
    with pytest.raises(MappingError, match="vision_encoder/"):
        maxtext_to_hf(tmp_path / "mt", tmp_path / "refused", dtype="float32", hf_config=str(twin / "config.json"))
    hf_to_maxtext(twin, tmp_path / "mt-text", scan=True, dtype="float32")
    with pytest.warns(UserWarning, match="no vision tower"):
        maxtext_to_hf(tmp_path / "mt-text", tmp_path / "hf-text", dtype="float32", hf_config=str(src / "config.json"))
    assert json.loads((tmp_path / "hf-text" / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]
    assert_bit_exact(hf_tensors(twin), hf_tensors(tmp_path / "hf-text"))

    ids = torch.tensor([list(range(3, 73))])  # past the 32-token chunk
    with torch.no_grad():  # the language model (transformers 5.24's text-only Llama4ForConditionalGeneration.forward
        # fails on its own output class)
        want, got = (
            AutoModelForImageTextToText.from_pretrained(f, dtype=torch.float32).language_model(input_ids=ids).logits
            for f in (src, tmp_path / "hf")
        )
        text = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-text", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want) and torch.equal(text, want)


def test_published_configs_are_the_multimodal_repos():
    for name, text in (("llama4-17b-16e", LLAMA4_SCOUT), ("llama4-17b-128e", LLAMA4_MAVERICK)):
        family, cfg = registry.model(name)
        assert family is Llama4 and registry.family_for_config(cfg) is Llama4
        assert cfg["model_type"] == "llama4" and cfg["architectures"] == ["Llama4ForConditionalGeneration"]
        assert cfg["text_config"] == {k: v for k, v in text.items() if k != "architectures"}
        v = cfg["vision_config"]  # MaxText's ymls: hidden_size_for_vit 1408, 34 layers, projector 4096
        assert (v["hidden_size"], v["num_hidden_layers"], v["projector_output_dim"]) == (1408, 34, 4096)
        d = Llama4.dims(cfg)
        assert d.extra["vision"]["layers"] == 34
        assert (d.layers, d.extra["step"]) == (48, text["interleave_moe_layer_step"])
    assert multimodal(LLAMA4_SCOUT)["text_config"]["model_type"] == "llama4_text"


def test_multimodal_and_unexpressible_configs_are_refused():
    mm_cfg = tiny_config("llama4-mm", layers=4)
    with pytest.raises(UnsupportedModelError, match="text_config"):  # a multimodal config without its text model
        Llama4.dims({**mm_cfg, "text_config": None})
    with pytest.raises(UnsupportedModelError, match="text_config"):
        Llama4.dims({**mm_cfg, "text_config": {**mm_cfg["text_config"], "model_type": "llama4_vision_model"}})
    with pytest.raises(UnsupportedModelError, match="tie_word_embeddings"):
        Llama4.dims({**mm_cfg, "tie_word_embeddings": True})
    with pytest.raises(UnsupportedModelError, match="model_type 'llama4_text' with a vision_config"):
        Llama4.dims({**tiny_config("llama4", layers=4), "vision_config": mm_cfg["vision_config"]})
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=2"):  # the text model's checks still run
        Llama4.dims({**mm_cfg, "text_config": {**mm_cfg["text_config"], "num_experts_per_tok": 2}})
    cfg = tiny_config("llama4-interleaved", layers=4)
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok"):
        Llama4.dims({**cfg, "num_experts_per_tok": 2})
    with pytest.raises(UnsupportedModelError, match="moe_layers"):
        Llama4.dims({**cfg, "moe_layers": [0, 3]})
    with pytest.raises(UnsupportedModelError, match="multiple of 4"):
        Llama4.plan(tiny_config("llama4", layers=2), scan=True)
    assert registry.model("llama4-17b-128e")[0] is Llama4 and registry.model("llama4-17b-16e")[0] is Llama4
