"""Gemma 4 text model, dense (`gemma4-31b`) and MoE (`gemma4-26b`): nested 6-layer scanned blocks, global layers of
another shape, keys as values; every tensor moved as is except the embedding, which MaxText stores times sqrt(hidden).

Tiny models (`converters.tiny_models.TINY["gemma4" / "gemma4-kv"]`): hidden 72 (sqrt(72) is no power of two), 4 heads
x head_dim 16 = 64 != hidden, 2 kv heads; global layers 4 heads x 32 with 1 kv head (2 without k_eq_v: transformers
reads `num_global_key_value_heads` only with it); MLP 96, an 8-token window, a
final soft-cap of 5, 12 layers: two blocks, so each scanned stack holds two entries per position and a stacking in
the wrong order shows. `gemma4` has the published `attention_k_eq_v` (global layers have no v_proj), `gemma4-kv`
not. `gemma4-moe` is `gemma4` with 26b's MoE block: 4 experts of width 40, 2 per token, the dense MLP (96) as the
shared expert, HF's fused `experts.gate_up_proj` split in halves into `wi_0` / `wi_1`.

All four directions: HF -> MaxText scanned and unscanned, MaxText -> HF from either layout, and back to MaxText.
Tolerance: bit-exact, except `embed_tokens` / `token_embedder/embedding`: multiplied by sqrt(72) in float32 and
rounded once to the stored dtype on the way in, divided and rounded once more on the way out, so within 1 ulp of the
stored dtype (and the round trip does reach 1 ulp). The exported model's logits agree with the source's to float32
noise.
"""

from __future__ import annotations

import copy
import json
import math

import ml_dtypes
import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError, UnsupportedModelError
from converters.families.gemma4 import GEMMA4_26B, GEMMA4_31B, GLOBAL, LOCAL, Gemma4
from converters.io.orbax import read_params
from tests.families.helpers import (
    IDS,
    assert_close,
    assert_config_kept,
    exported_logits,
    gemma4_layer,
    hf_tensors,
    ulp_distance,
)

LAYERS, P, BLOCKS = 12, 6, 2
E, N, KV, D, GKV, GD, F = 72, 4, 2, 16, 1, 32, 96
X, FM = 4, 40  # gemma4-moe: experts, expert width
MOE = "mlp/moe_block/MoeBlock_0"
SLOW = pytest.mark.slow  # the MoE model's other layouts and dtypes (the default run's time budget)


def expected_layer(hf: dict, i: int, k_eq_v: bool) -> dict:
    """MaxText arrays of HF layer i, laid out with numpy independently of the converter (`gemma4_layer`; global
    layers i % 6 == 5: their own head_dim / kv heads, no value kernel with attention_k_eq_v)."""
    a, glob = f"model.layers.{i}.self_attn.", i % P == P - 1
    kv, d = ((GKV if k_eq_v else KV), GD) if glob else (KV, D)  # transformers: the global kv heads only with k_eq_v
    assert a + "k_proj.weight" in hf and (a + "v_proj.weight" in hf) == (not (glob and k_eq_v)), i
    return gemma4_layer(hf, i, E, N, kv, d)


def stored(params: dict, rel: str, i: int, scan: bool) -> np.ndarray:
    """HF layer i's array `rel`: scanned, entry (i // 6, i % 6) of `local_layers` (axes 1, 2) or entry i // 6 of
    `global_layer` (axis 1); routed experts too (`[X, blocks, 5, ..]`: the expert axis stays first)."""
    if not scan:
        return params[f"decoder/layers_{i}/{rel}"]
    b, p = divmod(i, P)
    if p == P - 1:
        return np.take(params[f"decoder/scanned_blocks/global_layer/{rel}"], b, axis=1)
    return np.take(np.take(params[f"decoder/scanned_blocks/local_layers/{rel}"], b, axis=1), p, axis=1)


@pytest.mark.parametrize(
    "scan, family",
    [
        *((scan, family) for family in ("gemma4", "gemma4-kv") for scan in (True, False)),
        (True, "gemma4-moe"),
        pytest.param(False, "gemma4-moe", marks=SLOW),
    ],
    ids=lambda v: {True: "scanned", False: "unscanned"}.get(v, v),
)
def test_stored_values_at_every_layer(tiny_model, tmp_path, family, scan):
    src = tiny_model(family, layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    # MaxText's hook: the table times a float32 sqrt(hidden), the product rounded once to the stored dtype
    table = hf["model.embed_tokens.weight"]
    want = (table.astype(np.float32) * np.float32(math.sqrt(E))).astype(table.dtype)
    assert ulp_distance(params["token_embedder/embedding"], want) == 0
    assert ulp_distance(params["decoder/decoder_norm/scale"], hf["model.norm.weight"]) == 0
    k_eq_v = family != "gemma4-kv"
    if scan and family == "gemma4-moe":
        assert params[f"{LOCAL}/{MOE}/wi_0"].shape == (X, BLOCKS, 5, E, FM)
        assert params[f"{GLOBAL}/{MOE}/wo"].shape == (X, BLOCKS, FM, E)
        assert params[f"{LOCAL}/{MOE}/gate/kernel"].shape == (E, BLOCKS, 5, X)
        assert params[f"{GLOBAL}/{MOE}/per_expert_scale"].shape == (X, BLOCKS)
        assert params[f"{LOCAL}/mlp/moe_block/shared_experts/wo/kernel"].shape == (F, BLOCKS, 5, E)
    if scan:
        assert params["decoder/scanned_blocks/local_layers/self_attention/query/kernel"].shape == (E, BLOCKS, 5, N, D)
        gkv = GKV if k_eq_v else KV
        assert params["decoder/scanned_blocks/global_layer/self_attention/key/kernel"].shape == (E, BLOCKS, gkv, GD)
        assert params["decoder/scanned_blocks/local_layers/layer_scalar"].shape == (1, BLOCKS, 5)
        assert params["decoder/scanned_blocks/global_layer/self_attention/query_norm/scale"].shape == (GD, BLOCKS)
    for i in range(LAYERS):
        for rel, want in expected_layer(hf, i, k_eq_v).items():
            got = stored(params, rel, i, scan)
            assert got.shape == want.shape and ulp_distance(got, want) == 0, (rel, i)
    local, glob = len(expected_layer(hf, 0, k_eq_v)), len(expected_layer(hf, P - 1, k_eq_v))
    assert len(params) == 2 + (local + glob if scan else (LAYERS - BLOCKS) * local + BLOCKS * glob)
    assert ("decoder/scanned_blocks/global_layer/self_attention/value/kernel" in params) == (scan and not k_eq_v)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_restores_with_plain_orbax_in_maxtext_layout(tiny_model, tmp_path, scan):
    import orbax.checkpoint as ocp

    src = tiny_model("gemma4", layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    restored = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())
    tree = restored["params"]["params"]
    assert set(tree) == {"token_embedder", "decoder"}
    cfg = json.loads((src / "config.json").read_text())
    plan = {leaf.path: leaf.shape for leaf in registry.family_for_config(cfg).plan(cfg, scan)}
    assert {k: v.shape for k, v in read_params(tmp_path / "mt").items()} == plan
    decoder = tree["decoder"]
    if scan:
        assert set(decoder) == {"decoder_norm", "scanned_blocks"}
        assert set(decoder["scanned_blocks"]) == {"local_layers", "global_layer"}
    glob = decoder["scanned_blocks"]["global_layer"] if scan else decoder[f"layers_{LAYERS - 1}"]
    assert set(glob) == {
        "pre_self_attention_norm",
        "self_attention",
        "post_self_attention_norm",
        "pre_ffw_norm",
        "mlp",
        "post_ffw_norm",
        "layer_scalar",
    }
    assert set(glob["self_attention"]) == {"query", "key", "out", "query_norm", "key_norm"}
    assert all(v.dtype == ml_dtypes.bfloat16 for v in read_params(tmp_path / "mt").values())


@pytest.mark.parametrize("family", ["gemma4", "gemma4-kv"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_within_one_ulp_on_the_embedding(tiny_model, tmp_path, family, scan, dtype):
    src = tiny_model(family, layers=LAYERS, dtype=dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)  # HF -> MaxText (scanned / unscanned)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)  # MaxText (that layout, detected) -> HF
    # some elements move 1 ulp: sqrt(72) is no power of two
    assert assert_close(hf_tensors(src), hf_tensors(tmp_path / "hf"), "embed_tokens.weight") == 1
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)  # MaxText -> HF -> MaxText
    assert_close(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"), "token_embedder/embedding")


@pytest.mark.parametrize(
    "scan, dtype",
    [
        (True, "bfloat16"),
        pytest.param(True, "float32", marks=SLOW),
        pytest.param(False, "bfloat16", marks=SLOW),
        pytest.param(False, "float32", marks=SLOW),
    ],
    ids=["scanned-bfloat16", "scanned-float32", "unscanned-bfloat16", "unscanned-float32"],
)
def test_moe_round_trips_within_one_ulp_on_the_embedding(tiny_model, tmp_path, scan, dtype):
    """gemma4-moe in all four directions: the fused experts split and joined back, every tensor but the embedding
    bit-exact (the other layouts and dtypes: slow)."""
    test_round_trips_within_one_ulp_on_the_embedding(tiny_model, tmp_path, "gemma4-moe", scan, dtype)
    got = read_params(tmp_path / "mt")
    assert sum(k.endswith(("/wi_0", "/wi_1", "/wo")) for k in got) == (2 if scan else LAYERS) * 3


@pytest.mark.slow
def test_moe_restores_with_plain_orbax_in_maxtext_layout(tiny_model, tmp_path):
    """The MoE layer's tree as models/gemma4.py `Gemma4MoE` and layers/moe.py `RoutedAndSharedMoE` name it."""
    import orbax.checkpoint as ocp

    src = tiny_model("gemma4-moe", layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())["params"]["params"]
    for kind in ("local_layers", "global_layer"):
        mlp = tree["decoder"]["scanned_blocks"][kind]["mlp"]
        assert set(mlp) == {
            "moe_block",
            "pre_forward_scale_2",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        }
        assert set(mlp["moe_block"]) == {"MoeBlock_0", "shared_experts"}
        assert set(mlp["moe_block"]["MoeBlock_0"]) == {"gate", "wi_0", "wi_1", "wo", "per_expert_scale"}
        assert set(mlp["moe_block"]["shared_experts"]) == {"wi_0", "wi_1", "wo"}
    cfg = json.loads((src / "config.json").read_text())
    plan = {leaf.path: leaf.shape for leaf in registry.family_for_config(cfg).plan(cfg, True)}
    assert {k: v.shape for k, v in read_params(tmp_path / "mt").items()} == plan


def test_exports_from_either_layout_are_the_same_files(tiny_model, tmp_path):
    src = tiny_model("gemma4", layers=LAYERS)
    for scan in (True, False):
        hf_to_maxtext(src, tmp_path / f"mt{scan}", scan=scan)
        maxtext_to_hf(tmp_path / f"mt{scan}", tmp_path / f"hf{scan}")
    assert assert_close(hf_tensors(tmp_path / "hfTrue"), hf_tensors(tmp_path / "hfFalse"), "-") == 0


@pytest.mark.parametrize(
    "scan, family",
    [
        *((scan, family) for family in ("gemma4", "gemma4-kv") for scan in (True, False)),
        (True, "gemma4-moe"),
        pytest.param(False, "gemma4-moe", marks=SLOW),
    ],
    ids=lambda v: {True: "scanned", False: "unscanned"}.get(v, v),
)
def test_exported_folder_loads_in_transformers(tiny_model, tmp_path, family, scan):
    """The export is a Gemma4ForCausalLM with the source's config (window, soft-cap, per-type RoPE, the global layers'
    shape, k_eq_v) and its logits agree with the source's to float32 noise (the embedding is within 1 float32
    ulp)."""
    import torch
    from transformers import AutoConfig, Gemma4TextConfig

    src = tiny_model(family, layers=LAYERS, dtype="float32")
    want, got = exported_logits(src, tmp_path, IDS, scan=scan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(b) is Gemma4TextConfig
    assert_config_kept(
        a,
        b,
        "layer_types",
        "final_logit_softcapping",
        "attention_k_eq_v",
        "hidden_size_per_layer_input",
        "pad_token_id",
        "eos_token_id",
        "enable_moe_block",
        "num_experts",
        "top_k_experts",
        "moe_intermediate_size",
    )
    assert b.enable_moe_block == (family == "gemma4-moe")
    for layer in (0, P - 1):
        la, lb = a.per_layer_config[layer], b.per_layer_config[layer]
        assert (lb.head_dim, lb.num_key_value_heads) == (la.head_dim, la.num_key_value_heads)
    gkv = KV if family == "gemma4-kv" else GKV
    assert (b.per_layer_config[P - 1].head_dim, b.per_layer_config[P - 1].num_key_value_heads) == (GD, gkv)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4ForCausalLM"] and exported["model_type"] == "gemma4_text"
    assert exported["dtype"] == "float32"
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_published_config_is_maxtexts_gemma4_31b():
    """configs/models/gemma4-31b.yml: 60 layers of 5376, 32 query heads; local 16 kv heads of 256, global 4 of 512
    sharing K and V; MLP 21504 gelu-gated; vocab 262144, tied; eps 1e-6; window 1024; RoPE 1e4 local, 1e6 global on a
    quarter of the head; final soft-cap 30."""
    from transformers import Gemma4TextConfig

    family, cfg = registry.model("gemma4-31b")
    assert family is Gemma4 and registry.family_for_config(cfg) is family
    d = family.dims(cfg)
    assert (d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp, d.layers, d.vocab, d.tied) == (
        5376,
        32,
        16,
        256,
        21504,
        60,
        262144,
        True,
    )
    assert (d.extra["global_head_dim"], d.extra["global_kv_heads"], d.extra["k_eq_v"]) == (512, 4, True)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["sliding_window"] == 1024 and cfg["final_logit_softcapping"] == 30.0
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and not cfg["attention_bias"]
    hf = Gemma4TextConfig.from_dict(copy.deepcopy(cfg))
    assert hf.rope_parameters["sliding_attention"] == {"rope_theta": 10000.0, "rope_type": "default"}
    full = hf.rope_parameters["full_attention"]
    assert (full["rope_type"], full["rope_theta"], full["partial_rotary_factor"]) == ("proportional", 1e6, 0.25)
    assert hf.layer_types[5] == "full_attention" and hf.layer_types.count("full_attention") == 10
    assert (hf.per_layer_config[5].head_dim, hf.per_layer_config[5].num_key_value_heads) == (512, 4)
    assert (hf.per_layer_config[0].head_dim, hf.per_layer_config[0].num_key_value_heads) == (256, 16)
    assert GEMMA4_31B["hidden_size_per_layer_input"] == 0 and not GEMMA4_31B["enable_moe_block"]


def test_published_config_is_maxtexts_gemma4_26b():
    """configs/models/gemma4-26b.yml: 30 layers of 2816, 16 query heads; local 8 kv heads of 256, global 2 of 512
    sharing K and V; a shared MLP of 2112 (base_mlp_dim: moe.py sizes gemma4's shared expert by mlp_dim) and 128
    routed experts of 704 (base_moe_mlp_dim), 8 per token, renormalised (norm_topk_prob); everything else as 31b. The
    text_config of MaxText's hf_model_configs.py gemma4_26b_dict (google/gemma-4-26b-a4b-it) agrees."""
    from transformers import Gemma4TextConfig

    family, cfg = registry.model("gemma4-26b")
    assert family is Gemma4 and registry.family_for_config(cfg) is family
    d = family.dims(cfg)
    assert (d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp, d.layers, d.vocab) == (2816, 16, 8, 256, 2112, 30, 262144)
    assert (d.extra["global_head_dim"], d.extra["global_kv_heads"], d.extra["k_eq_v"]) == (512, 2, True)
    assert (d.extra["experts"], d.extra["top_k"], d.extra["moe_mlp"]) == (128, 8, 704)
    hf = Gemma4TextConfig.from_dict(copy.deepcopy(cfg))
    assert hf.enable_moe_block and (hf.num_experts, hf.top_k_experts, hf.moe_intermediate_size) == (128, 8, 704)
    assert (hf.per_layer_config[5].head_dim, hf.per_layer_config[5].num_key_value_heads) == (512, 2)
    assert hf.layer_types.count("full_attention") == 5 and hf.intermediate_size == 2112
    # everything but the dimensions and the MoE keys is 31b's
    differ = {k for k in GEMMA4_26B if GEMMA4_26B[k] != GEMMA4_31B.get(k)}
    assert differ == {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_global_key_value_heads",
        "layer_types",
        "enable_moe_block",
        "num_experts",
        "top_k_experts",
        "moe_intermediate_size",
    }


def test_real_size_plan_is_maxtexts_whole_tree():
    """Not a subset: the 29 scanned arrays are exactly MaxText 0.2.5's tree for gemma4-31b (nnx.eval_shape), and the
    unscanned plan has its 832: 2 + 50 local layers x 14 + 10 global x 13 (no value kernel)."""
    from tests.families.test_shapes import EXPECTED

    family, cfg = registry.model("gemma4-31b")
    assert {l.path: l.shape for l in family.plan(cfg, True)} == EXPECTED["gemma4-31b"]
    assert len(family.plan(cfg, False)) == 832


def test_real_size_moe_plan_is_maxtexts_whole_tree():
    """gemma4-26b: the 47 scanned arrays are exactly MaxText 0.2.5's tree (nnx.eval_shape), and the unscanned plan has
    its 687: 2 + 25 local layers x 23 + 5 global x 22."""
    from tests.families.test_shapes import EXPECTED

    family, cfg = registry.model("gemma4-26b")
    assert {l.path: l.shape for l in family.plan(cfg, True)} == EXPECTED["gemma4-26b"]
    assert len(family.plan(cfg, False)) == 687


MOE_KEYS = {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 8}


def test_refused_configs(tiny_model):
    cfg = json.loads((tiny_model("gemma4", layers=LAYERS) / "config.json").read_text())
    Gemma4.plan(cfg, scan=True)
    # num_experts without enable_moe_block: transformers builds the dense layer, and so does the plan
    assert Gemma4.plan({**cfg, "num_experts": 4}, scan=True) == Gemma4.plan(cfg, scan=True)
    refused = [
        ({"hidden_size_per_layer_input": 256}, UnsupportedModelError, "per-layer embeddings"),
        ({"num_kv_shared_layers": 6}, UnsupportedModelError, "shared KV"),
        ({"enable_moe_block": True, "num_experts": 8}, MappingError, "no top_k_experts, moe_intermediate_size"),
        ({**MOE_KEYS, "num_experts": 1}, MappingError, "num_experts=1"),
        ({**MOE_KEYS, "top_k_experts": 5}, MappingError, "top_k_experts=5"),
        ({"use_bidirectional_attention": "all"}, UnsupportedModelError, "bidirectional"),
        ({"tie_word_embeddings": False}, MappingError, "tie_word_embeddings"),
        ({"attention_bias": True}, MappingError, "attention_bias"),
        ({"num_hidden_layers": 8, "layer_types": None}, MappingError, "multiple of 6"),
        ({"layer_types": ["full_attention"] * LAYERS}, MappingError, "5 local"),
    ]
    for change, error, match in refused:
        with pytest.raises(error, match=match):
            Gemma4.plan({**cfg, **change}, scan=False)
