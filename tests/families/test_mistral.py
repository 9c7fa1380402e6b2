"""Mistral: Llama's tree with the HF (half-split) RoPE layout kept and the query scaled by 1/sqrt(head_dim).

Tiny model (`converters.tiny_models.TINY["mistral"]`): hidden 64, 4 heads x head_dim 32 = 128 != hidden (projections
must be sized from heads x head_dim), 2 kv heads, MLP 96, 3 layers, untied. `mistral-window` adds a 32-token sliding
window (as Mistral-7B-v0.1's config has one of 4096).

All four directions: HF -> MaxText scanned and unscanned, MaxText -> HF from either layout (and back to MaxText).
Tolerance: everything is bit-exact except the query kernel. MaxText stores q_proj times 1/sqrt(head_dim) (tiny: 32,
real: 128; neither is a power of four, so the factor is no power of two), computed in float32 and rounded once to the
stored dtype on the way in, divided and rounded once more on the way out: the HF query comes back within 1 ulp of its
dtype, never more, in bfloat16 and float32. The stored query equals round(f32(q) * f32(1/sqrt(head_dim))).
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.io.orbax import read_params
from tests.families.helpers import (
    IDS,
    assert_close,
    assert_config_kept,
    exported_logits,
    hf_tensors,
    model_cache,
    ulp_distance,
)

FAMILY, LAYERS = "mistral", 3
E, N, KV, D, F = 64, 4, 2, 32, 96


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, FAMILY, LAYERS)


def expected_layer(hf: dict, i: int) -> dict:
    """MaxText arrays of HF layer i, laid out with numpy independently of the converter (src/maxtext/models/mistral.py
    names; q and k keep HF's half-split rows: no RoPE permutation)."""
    p = f"model.layers.{i}."
    q = hf[p + "self_attn.q_proj.weight"]
    return {
        "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        # float32 product with a float32 scalar, rounded once to the tensor's dtype
        "self_attention/query/kernel": (q.T.reshape(E, N, D).astype(np.float32) * np.float32(1 / math.sqrt(D))).astype(
            q.dtype
        ),
        "self_attention/key/kernel": hf[p + "self_attn.k_proj.weight"].T.reshape(E, KV, D),
        "self_attention/value/kernel": hf[p + "self_attn.v_proj.weight"].T.reshape(E, KV, D),
        "self_attention/out/kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(N, D, E),
        "mlp/wi_0/kernel": hf[p + "mlp.gate_proj.weight"].T,
        "mlp/wi_1/kernel": hf[p + "mlp.up_proj.weight"].T,
        "mlp/wo/kernel": hf[p + "mlp.down_proj.weight"].T,
    }


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_at_every_layer(hf_model, tmp_path, scan):
    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    assert params["token_embedder/embedding"].shape == (512, E)
    assert ulp_distance(params["decoder/logits_dense/kernel"], hf["lm_head.weight"].T) == 0
    assert ulp_distance(params["decoder/decoder_norm/scale"], hf["model.norm.weight"]) == 0
    if scan:
        assert params["decoder/layers/self_attention/query/kernel"].shape == (E, LAYERS, N, D)
        assert params["decoder/layers/self_attention/out/kernel"].shape == (N, LAYERS, D, E)
        assert params["decoder/layers/mlp/wo/kernel"].shape == (F, LAYERS, E)
    n_layer_arrays = 0
    for i in range(LAYERS):
        for rel, want in expected_layer(hf, i).items():
            got = np.take(params[f"decoder/layers/{rel}"], i, axis=1) if scan else params[f"decoder/layers_{i}/{rel}"]
            assert got.shape == want.shape and ulp_distance(got, want) == 0, (rel, i)
            n_layer_arrays += 1
    assert len(params) == 3 + (len(expected_layer(hf, 0)) if scan else n_layer_arrays)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_restores_with_plain_orbax_in_maxtext_layout(hf_model, tmp_path, scan):
    import orbax.checkpoint as ocp

    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    restored = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())
    tree = restored["params"]["params"]
    assert set(tree) == {"token_embedder", "decoder"}
    cfg = json.loads((src / "config.json").read_text())
    plan = {leaf.path: leaf.shape for leaf in registry.family_for_config(cfg).plan(cfg, scan)}
    got = {k: v.shape for k, v in read_params(tmp_path / "mt").items()}
    assert got == plan
    layers = tree["decoder"]["layers"] if scan else tree["decoder"][f"layers_{LAYERS - 1}"]
    assert set(layers) == {"pre_self_attention_layer_norm", "self_attention", "post_self_attention_layer_norm", "mlp"}
    assert all(v.dtype == ml_dtypes.bfloat16 for v in read_params(tmp_path / "mt").values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_within_one_ulp_on_the_query(hf_model, tmp_path, scan, dtype):
    src = hf_model(dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)  # HF -> MaxText (scanned / unscanned)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)  # MaxText (that layout, detected) -> HF
    assert assert_close(hf_tensors(src), hf_tensors(tmp_path / "hf"), "q_proj.weight") == 1  # some elements move 1 ulp
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)  # MaxText -> HF -> MaxText
    assert_close(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"), "query/kernel")


def test_tied_variant_has_no_logits_kernel(tiny_model, tmp_path):
    src = tiny_model(FAMILY, tied=True)
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    assert "decoder/logits_dense/kernel" not in read_params(tmp_path / "mt")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    assert "lm_head.weight" not in hf_tensors(tmp_path / "hf")


@pytest.mark.parametrize("family", ["mistral", "mistral-window"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_exported_folder_loads_in_transformers(tiny_model, tmp_path, family, scan):
    """The export is a MistralForCausalLM with the source's config (window and rope theta included) and its logits
    agree with the source's to float32 noise (the query is within 1 float32 ulp)."""
    import torch
    from transformers import AutoConfig, MistralConfig

    src = tiny_model(family, dtype="float32")
    want, got = exported_logits(src, tmp_path, IDS, scan=scan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(b) is MistralConfig
    assert_config_kept(a, b, "num_key_value_heads", "head_dim")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["MistralForCausalLM"] and exported["model_type"] == "mistral"
    assert exported["dtype"] == "float32"
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_published_config_is_maxtexts_mistral_7b():
    """configs/models/mistral-7b.yml: vocab 32000, rope_max_timescale 1e6, no window, 32 x (32 q, 8 kv heads of 128)."""
    family, cfg = registry.model("mistral-7b")
    assert family.name == "mistral" and registry.family_for_config(cfg) is family
    assert cfg["vocab_size"] == 32000 and cfg["rope_theta"] == 1e6 and cfg["sliding_window"] is None
    d = family.dims(cfg)
    assert (d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp, d.layers, d.tied) == (4096, 32, 8, 128, 14336, 32, False)
    assert registry.model("mistral-7b-Instruct")[0] is family


def test_bf16_query_scale_is_not_exact_but_bounded():
    """Why the query needs an ulp rule at the real size too: 1/sqrt(128) = 2^-3.5 is no power of two."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(4096).astype(ml_dtypes.bfloat16)
    s = np.float32(1 / math.sqrt(128))
    back = ((q.astype(np.float32) * s).astype(ml_dtypes.bfloat16).astype(np.float32) / s).astype(ml_dtypes.bfloat16)
    assert ulp_distance(q, back) == 1


def test_real_size_plan_is_maxtexts_whole_tree():
    """Not a subset: the 12 scanned arrays are exactly MaxText 0.2.5's tree for mistral-7b; unscanned 3 + 9 x 32."""
    from tests.families.test_shapes import EXPECTED

    family, cfg = registry.model("mistral-7b")
    assert {l.path: l.shape for l in family.plan(cfg, True)} == EXPECTED["mistral-7b"]
    assert len(family.plan(cfg, False)) == 291
