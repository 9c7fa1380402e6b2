"""OLMo 3: post-norms, q/k RMSNorm over the whole projection, 4-layer scanned blocks; every tensor only moved.

Tiny models (`converters.tiny_models.TINY["olmo3" / "olmo3-pt"]`): hidden 64, 4 heads x head_dim 32 = 128 != hidden
(projections sized from heads x head_dim), 2 kv heads (q_norm 128 wide, k_norm 64), MLP 96, a 16-token window, 8
layers: two periods of MaxText's pattern, so each scanned stack `decoder/layers/layers_<b>` holds two HF layers
(b and b + 4) and a stacking in the wrong order shows. `olmo3` has the published YaRN (context shrunk to 128),
`olmo3-pt` plain RoPE.

All four directions: HF -> MaxText scanned and unscanned, MaxText -> HF from either layout, and back to MaxText.
Tolerance: none. MaxText's olmo3 block scales the query at run time and uses HF's half-split RoPE layout, and its
norms are plain scales, so no value is changed: bit-exact in bfloat16 and float32, and the exported model gives the
source's logits bit for bit.
"""

from __future__ import annotations

import copy
import json

import ml_dtypes
import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError
from converters.families.olmo3 import Olmo3
from converters.io.orbax import read_params
from tests.families.helpers import (
    IDS,
    assert_bit_exact,
    assert_config_kept,
    attention_kernels,
    hf_tensors,
    mlp_kernels,
    qk_norms,
    round_trip,
)

LAYERS, P = 8, 4
E, N, KV, D, F = 64, 4, 2, 32, 96


def expected_layer(hf: dict, i: int) -> dict:
    """MaxText arrays of HF layer i, laid out with numpy independently of the converter (src/maxtext/models/olmo3.py
    names: the attention module is `attention`; q/k norms are one [heads * head_dim] scale each)."""
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    return {
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        "post_mlp_layer_norm/scale": hf[p + "post_feedforward_layernorm.weight"],
        **attention_kernels(hf, a, E, N, KV, D, module="attention"),
        **qk_norms(hf, a, module="attention"),
        **mlp_kernels(hf, p + "mlp."),
    }


def stored(params: dict, rel: str, i: int, scan: bool) -> np.ndarray:
    """HF layer i's array `rel`: scanned, entry i // 4 (axis 1) of stack `layers_<i % 4>`."""
    return (
        np.take(params[f"decoder/layers/layers_{i % P}/{rel}"], i // P, axis=1)
        if scan
        else params[f"decoder/layers_{i}/{rel}"]
    )


@pytest.mark.parametrize("family", ["olmo3", "olmo3-pt"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_at_every_layer(tiny_model, tmp_path, family, scan):
    src = tiny_model(family, layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    assert_bit_exact(
        {
            "e": params["token_embedder/embedding"],
            "n": params["decoder/decoder_norm/scale"],
            "l": params["decoder/logits_dense/kernel"],
        },
        {
            "e": hf["model.embed_tokens.weight"],
            "n": hf["model.norm.weight"],
            "l": np.ascontiguousarray(hf["lm_head.weight"].T),
        },
    )
    if scan:
        assert params["decoder/layers/layers_3/attention/query/kernel"].shape == (E, LAYERS // P, N, D)
        assert params["decoder/layers/layers_0/attention/query_norm/scale"].shape == (N * D, LAYERS // P)
        assert params["decoder/layers/layers_1/attention/key_norm/scale"].shape == (KV * D, LAYERS // P)
        assert params["decoder/layers/layers_2/attention/out/kernel"].shape == (N, LAYERS // P, D, E)
    for i in range(LAYERS):
        for rel, want in expected_layer(hf, i).items():
            got = stored(params, rel, i, scan)
            assert got.shape == want.shape and got.dtype == want.dtype, (rel, i)
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (rel, i)
    per_layer = len(expected_layer(hf, 0))
    assert len(params) == 3 + (P if scan else LAYERS) * per_layer


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_restores_with_plain_orbax_in_maxtext_layout(tiny_model, tmp_path, scan):
    import orbax.checkpoint as ocp

    src = tiny_model("olmo3", layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    restored = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())
    decoder = restored["params"]["params"]["decoder"]
    cfg = json.loads((src / "config.json").read_text())
    plan = {leaf.path: leaf.shape for leaf in registry.family_for_config(cfg).plan(cfg, scan)}
    assert {k: v.shape for k, v in read_params(tmp_path / "mt").items()} == plan
    layer = decoder["layers"]["layers_3"] if scan else decoder[f"layers_{LAYERS - 1}"]
    assert set(layer) == {"attention", "post_self_attention_layer_norm", "mlp", "post_mlp_layer_norm"}
    assert set(layer["attention"]) == {"query", "key", "value", "out", "query_norm", "key_norm"}
    if scan:
        assert set(decoder["layers"]) == {f"layers_{b}" for b in range(P)}
    assert all(v.dtype == ml_dtypes.bfloat16 for v in read_params(tmp_path / "mt").values())


@pytest.mark.parametrize("family", ["olmo3", "olmo3-pt"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_are_bit_exact(tiny_model, tmp_path, family, scan, dtype):
    """HF -> MaxText (scanned / unscanned) -> HF -> MaxText: both HF folders and both checkpoints bit-identical."""
    round_trip(tiny_model(family, layers=LAYERS, dtype=dtype), tmp_path, scan=scan, dtype=dtype)


def test_exports_from_either_layout_are_the_same_files(tiny_model, tmp_path):
    """MaxText -> HF from a scanned and from an unscanned checkpoint of one model: the same tensors."""
    src = tiny_model("olmo3", layers=LAYERS)
    for scan in (True, False):
        hf_to_maxtext(src, tmp_path / f"mt{scan}", scan=scan)
        maxtext_to_hf(tmp_path / f"mt{scan}", tmp_path / f"hf{scan}")
    assert_bit_exact(hf_tensors(tmp_path / "hfTrue"), hf_tensors(tmp_path / "hfFalse"))


def test_tied_variant_has_no_logits_kernel(tiny_model, tmp_path):
    src = tiny_model("olmo3", layers=P, tied=True)
    params, _ = round_trip(src, tmp_path, scan=True)
    assert "decoder/logits_dense/kernel" not in params
    assert "lm_head.weight" not in hf_tensors(tmp_path / "hf")


@pytest.mark.parametrize("family", ["olmo3", "olmo3-pt"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_exported_folder_loads_in_transformers(tiny_model, tmp_path, family, scan):
    """The export is an Olmo3ForCausalLM with the source's config (window, layer types, per-layer-type rope parameters)
    and the source's logits, bit for bit."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Olmo3Config

    src = tiny_model(family, layers=LAYERS, dtype="float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(b) is Olmo3Config
    assert_config_kept(a, b, "num_key_value_heads", "head_dim", "layer_types", "pad_token_id", "eos_token_id")
    if family == "olmo3":
        assert b.rope_parameters["full_attention"]["rope_type"] == "yarn"
        assert b.rope_parameters["sliding_attention"]["rope_type"] == "default"
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["Olmo3ForCausalLM"] and exported["model_type"] == "olmo3"
    assert exported["dtype"] == "float32"
    assert (tmp_path / "hf" / "generation_config.json").exists()


# configs/models/olmo3-*.yml: (emb, query heads, kv heads, head_dim, mlp, layers, max positions, rope)
YML = {
    "olmo3-7b": (4096, 32, 32, 128, 11008, 32, 65536, "yarn"),
    "olmo3-7b-pt": (4096, 32, 32, 128, 11008, 32, 8192, "default"),
    "olmo3-32b": (5120, 40, 8, 128, 27648, 64, 65536, "yarn"),
}


@pytest.mark.parametrize("name", sorted(YML))
def test_published_configs_are_maxtexts_ymls(name):
    """Built from MaxText's yml (the hub is out of reach): dimensions, eps 1e-6, rope theta 5e5, window 4096, vocab
    100278, untied, no biases, silu; YaRN factor 8 from 8192 with beta 32 / 1 for olmo3-7b and olmo3-32b."""
    from transformers import Olmo3Config

    family, cfg = registry.model(name)
    assert family is Olmo3 and registry.family_for_config(cfg) is family
    e, n, kv, hd, f, layers, positions, rope = YML[name]
    d = family.dims(cfg)
    assert (d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp, d.layers, d.vocab, d.tied) == (
        e,
        n,
        kv,
        hd,
        f,
        layers,
        100278,
        False,
    )
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 500000 and cfg["sliding_window"] == 4096
    assert cfg["max_position_embeddings"] == positions and not cfg["attention_bias"] and cfg["hidden_act"] == "silu"
    hf = Olmo3Config.from_dict(copy.deepcopy(cfg))
    assert (
        hf.layer_types == ["sliding_attention"] * 3 + ["full_attention"] + hf.layer_types[4:]
        and hf.layer_types[7] == "full_attention"
    )
    assert hf.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 500000}
    full = hf.rope_parameters["full_attention"]
    assert full["rope_type"] == rope and full["rope_theta"] == 500000
    if rope == "yarn":
        assert (full["factor"], full["original_max_position_embeddings"], full["beta_fast"], full["beta_slow"]) == (
            8.0,
            8192,
            32.0,
            1.0,
        )
        assert full["attention_factor"] == 0.1 * np.log(8.0) + 1.0  # MaxText's rope_attention_scaling value, exactly
    assert registry.model(f"{name}-Instruct")[0] is family


@pytest.mark.parametrize("name", sorted(YML))
def test_real_size_plan_is_maxtexts_whole_tree(name):
    """Not a subset: the 47 scanned arrays are exactly MaxText 0.2.5's tree (nnx.eval_shape for the model name);
    unscanned 3 + 11 per layer."""
    from tests.families.test_shapes import EXPECTED

    family, cfg = registry.model(name)
    assert {l.path: l.shape for l in family.plan(cfg, True)} == EXPECTED[name]
    assert len(family.plan(cfg, False)) == 3 + 11 * YML[name][5]


def test_refused_configs(tiny_model):
    cfg = json.loads((tiny_model("olmo3", layers=6) / "config.json").read_text())
    Olmo3.plan(cfg, scan=False)  # 6 layers convert unscanned ...
    with pytest.raises(MappingError, match="multiple of 4 layers"):  # ... but MaxText scans whole 4-layer blocks only
        Olmo3.plan(cfg, scan=True)
    with pytest.raises(MappingError, match="fixed pattern"):
        Olmo3.plan({**cfg, "layer_types": ["full_attention"] * 6}, scan=False)
    with pytest.raises(MappingError, match="attention_bias"):
        Olmo3.plan({**cfg, "attention_bias": True}, scan=False)
