"""Llama 4 text model: 4-layer scanned blocks, dense and MoE layers interleaved, fused experts split and joined.

Tiny models (`converters.tiny_models.TINY["llama4"]`, Scout's path: every layer MoE; `["llama4-interleaved"]`,
Maverick's path: dense, MoE, dense, MoE): 4 heads x head_dim 32 != hidden 64, 4 experts, top-1, 4 layers (the
4th without RoPE). Every transform only moves elements: round trips are bit-exact. Stored values are compared
with a plain-numpy layout of the HF tensors (gate_up_proj's first half -> wi_0, second -> wi_1, no transpose;
down_proj as is; router and Linear weights transposed; no RoPE permutation, no query scale -- the layout
MaxText's standalone_scripts/llama4_ckpt_unscanned.py writes for scale_query=False).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core import registry
from converters.errors import UnsupportedModelError
from converters.families.llama4 import LLAMA4_MAVERICK, LLAMA4_SCOUT, Llama4
from converters.io.orbax import read_params
from converters.tiny_models import tiny_config
from tests.families.helpers import bits, exported_logits, hf_tensors, model_cache, round_trip

LAYERS, EXPERTS = 4, 4
E, N, KV, D, F, FD = 64, 4, 2, 32, 48, 96
MOE = "Llama4MoEBlock_0"


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4", LAYERS)


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    return model_cache(tmp_path_factory, "llama4-interleaved", LAYERS)


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


def test_multimodal_and_unexpressible_configs_are_refused():
    with pytest.raises(UnsupportedModelError, match="vision tower"):
        Llama4.dims({"model_type": "llama4", "text_config": {}, "vision_config": {}})
    cfg = tiny_config("llama4-interleaved", layers=4)
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok"):
        Llama4.dims({**cfg, "num_experts_per_tok": 2})
    with pytest.raises(UnsupportedModelError, match="moe_layers"):
        Llama4.dims({**cfg, "moe_layers": [0, 3]})
    with pytest.raises(UnsupportedModelError, match="multiple of 4"):
        Llama4.plan(tiny_config("llama4", layers=2), scan=True)
    assert registry.model("llama4-17b-128e")[0] is Llama4 and registry.model("llama4-17b-16e")[0] is Llama4
