"""Gemma 4 small text models (`gemma4-e2b`, `gemma4-e4b`; MaxText block `gemma4_small`): unscanned only, per-layer
inputs, KV-shared layers without K/V arrays, double-wide MLPs on e2b's shared layers; every tensor moved as is except
the embedding, which MaxText stores times sqrt(hidden).

Tiny models (`converters.tiny_models.TINY["gemma4-e2b" / "gemma4-e4b"]`): hidden 72 (sqrt(72) is no power of two),
4 heads x 16 = 64 != hidden, global layers of head_dim 32; e2b one kv head, period 5 (4 local + 1 global), 10
layers; e4b two kv heads, period 6, 12 layers; both the last 4 layers KV-shared (a local donor and a global donor),
per-layer inputs of 8 over the 512-token vocabulary, an 8-token window, a final soft-cap of 5.

Tolerance: bit-exact, except `embed_tokens` / `token_embedder/embedding`: multiplied by sqrt(72) in float32 and rounded
once to the stored dtype on the way in, divided and rounded once more on the way out, so within 1 ulp of the stored
dtype (and the round trip does reach 1 ulp). The per-layer table `embed_tokens_per_layer` is not scaled: MaxText and
HF both multiply it by sqrt(P) at run time (param_mapping.py has no hook for it), so it round-trips bit-exactly.
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
from converters.families.gemma4_small import GEMMA4_E2B, GEMMA4_E4B, Gemma4Small
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

MODELS = ["gemma4-e2b", "gemma4-e4b"]
E, N, D, GD, F, PL = 72, 4, 16, 32, 96, 8
# (layers, period, kv heads, first shared layer, double-wide shared MLPs) of the tiny models
SHAPE = {"gemma4-e2b": (10, 5, 1, 6, True), "gemma4-e4b": (12, 6, 2, 8, False)}


def expected_layer(hf: dict, family: str, i: int) -> dict:
    """MaxText arrays of HF layer i, laid out with numpy independently of the converter (`gemma4_layer` plus the
    per-layer input arrays; global layers i % period == period - 1 their own head_dim; shared layers no key / value /
    key_norm and, on e2b, twice the MLP)."""
    n, period, kv, first, wide = SHAPE[family]
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    d = GD if i % period == period - 1 else D
    f = 2 * F if wide and i >= first else F
    assert (a + "k_proj.weight" in hf) == (a + "v_proj.weight" in hf) == (i < first), i
    out = gemma4_layer(hf, i, E, N, kv, d) | {
        "per_layer_input_gate/kernel": hf[p + "per_layer_input_gate.weight"].T,
        "per_layer_projection/kernel": hf[p + "per_layer_projection.weight"].T,
        "post_per_layer_input_norm/scale": hf[p + "post_per_layer_input_norm.weight"],
    }
    assert out["mlp/wi_0/kernel"].shape == (E, f)
    return out


@pytest.mark.parametrize("family", ["gemma4-e2b", pytest.param("gemma4-e4b", marks=pytest.mark.slow)])
def test_stored_values_at_every_layer(tiny_model, tmp_path, family):
    src = tiny_model(family)
    hf_to_maxtext(src, tmp_path / "mt", scan=False)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    n = SHAPE[family][0]
    # MaxText's hook: the table times a float32 sqrt(hidden), the product rounded once to the stored dtype
    table = hf["model.embed_tokens.weight"]
    want = (table.astype(np.float32) * np.float32(math.sqrt(E))).astype(table.dtype)
    assert ulp_distance(params["token_embedder/embedding"], want) == 0
    ple = "decoder/per_layer_embedder/"
    globals_ = {
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
        ple + "embed_tokens_per_layer": hf["model.embed_tokens_per_layer.weight"],  # as is: no hook
        ple + "per_layer_model_projection/kernel": hf["model.per_layer_model_projection.weight"].T,
        ple + "per_layer_projection_norm/scale": hf["model.per_layer_projection_norm.weight"],
    }
    assert params[ple + "embed_tokens_per_layer"].shape == (512, n * PL)
    for key, want in globals_.items():
        assert params[key].shape == want.shape and ulp_distance(params[key], want) == 0, key
    count = 1 + len(globals_)
    for i in range(n):
        for rel, want in expected_layer(hf, family, i).items():
            got = params[f"decoder/layers_{i}/{rel}"]
            assert got.shape == want.shape and ulp_distance(got, want) == 0, (rel, i)
            count += 1
    assert len(params) == count


def test_scanned_is_refused_with_maxtexts_reason(tiny_model, tmp_path):
    """MaxText 0.2.5 builds no scanned gemma4_small model (nnx_decoders.py and configs/types.py raise for
    scan_layers=true), so there is no scanned layout to write or read."""
    src = tiny_model("gemma4-e2b")
    with pytest.raises(UnsupportedModelError, match="scan_layers=false"):
        hf_to_maxtext(src, tmp_path / "mt", scan=True)
    assert not (tmp_path / "mt").exists()


@pytest.mark.slow
def test_restores_with_plain_orbax_in_maxtext_layout(tiny_model, tmp_path):
    import orbax.checkpoint as ocp

    src = tiny_model("gemma4-e2b")
    hf_to_maxtext(src, tmp_path / "mt", scan=False)
    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())["params"]["params"]
    assert set(tree) == {"token_embedder", "decoder"}
    cfg = json.loads((src / "config.json").read_text())
    plan = {leaf.path: leaf.shape for leaf in registry.family_for_config(cfg).plan(cfg, False)}
    assert {k: v.shape for k, v in read_params(tmp_path / "mt").items()} == plan
    decoder = tree["decoder"]
    assert set(decoder) == {"decoder_norm", "per_layer_embedder", *(f"layers_{i}" for i in range(10))}
    assert set(decoder["per_layer_embedder"]) == {
        "embed_tokens_per_layer",
        "per_layer_model_projection",
        "per_layer_projection_norm",
    }
    assert set(decoder["layers_9"]["self_attention"]) == {"query", "out", "query_norm"}  # shared: the donor's K/V
    assert set(decoder["layers_4"]["self_attention"]) == {"query", "key", "value", "out", "query_norm", "key_norm"}
    assert all(v.dtype == ml_dtypes.bfloat16 for v in read_params(tmp_path / "mt").values())


@pytest.mark.parametrize(
    "family,dtype",
    [
        ("gemma4-e2b", "bfloat16"),
        pytest.param("gemma4-e2b", "float32", marks=pytest.mark.slow),
        pytest.param("gemma4-e4b", "bfloat16", marks=pytest.mark.slow),
        pytest.param("gemma4-e4b", "float32", marks=pytest.mark.slow),
    ],
)
def test_round_trips_within_one_ulp_on_the_embedding(tiny_model, tmp_path, family, dtype):
    src = tiny_model(family, dtype=dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype=dtype)  # HF -> MaxText
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)  # MaxText (unscanned, detected) -> HF
    # some elements move 1 ulp: sqrt(72) is no power of two; embed_tokens_per_layer is exact
    assert assert_close(hf_tensors(src), hf_tensors(tmp_path / "hf"), "model.embed_tokens.weight") == 1
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=False, dtype=dtype)  # MaxText -> HF -> MaxText
    assert_close(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"), "token_embedder/embedding")


@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_exported_folder_loads_in_transformers(tiny_model, tmp_path, family):
    """The export is a Gemma4ForCausalLM with the source's config (per-layer inputs, KV sharing, double-wide MLP,
    pattern, window, soft-cap, per-type RoPE, the global layers' shape) and its logits agree with the source's: the
    embedding differs by at most 1 float32 ulp (the sqrt(72) scale), which moves the logits (|logits| < 5, the cap)
    by < 2e-4 through the embedding and the per-layer projection of it."""
    import torch
    from transformers import AutoConfig, Gemma4TextConfig

    src = tiny_model(family, dtype="float32")
    want, got = exported_logits(src, tmp_path, IDS, scan=False)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(b) is Gemma4TextConfig
    assert_config_kept(
        a,
        b,
        "num_key_value_heads",
        "layer_types",
        "final_logit_softcapping",
        "hidden_size_per_layer_input",
        "vocab_size_per_layer_input",
        "num_kv_shared_layers",
        "use_double_wide_mlp",
        "attention_k_eq_v",
        "pad_token_id",
        "eos_token_id",
    )
    assert b.kv_sharing_modes == a.kv_sharing_modes and b.kv_sharing_modes.count("reuse") == 4
    period = SHAPE[family][1]
    assert (b.per_layer_config[period - 1].head_dim, b.per_layer_config[0].head_dim) == (GD, D)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4ForCausalLM"] and exported["model_type"] == "gemma4_text"
    assert exported["dtype"] == "float32"
    assert (tmp_path / "hf" / "generation_config.json").exists()


@pytest.mark.slow
def test_unused_kv_tensors_of_shared_layers_are_ignored(tiny_model, tmp_path):
    """Published checkpoints may carry k/v projections and norms for the shared layers, which transformers ignores on
    load (`_keys_to_ignore_on_load_unexpected`); they convert the same, and are not exported."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_model("gemma4-e2b", dtype="float32"), src)
    tensors = load_file(src / "model.safetensors")
    rng = np.random.default_rng(0)
    for i in range(6, 10):  # the shared layers
        d = GD if i == 9 else D
        for name, shape in (("k_proj", (d, E)), ("v_proj", (d, E)), ("k_norm", (d,)), ("v_norm", (d,))):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    hf_to_maxtext(tiny_model("gemma4-e2b", dtype="float32"), tmp_path / "plain", scan=False, dtype="float32")
    assert_close(read_params(tmp_path / "mt"), read_params(tmp_path / "plain"), "-")
    with pytest.raises(MappingError, match="k_proj"):  # an unshared layer's K/V stay required
        del tensors["model.layers.5.self_attn.k_proj.weight"]
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
        hf_to_maxtext(src, tmp_path / "mt2", scan=False, dtype="float32")


@pytest.mark.parametrize("name", MODELS)
def test_published_configs_are_maxtexts(name):
    """configs/models/gemma4-e2b.yml: 35 layers of 1536, 8 query heads, 1 kv head, MLP 6144, 20 shared layers with
    double-wide MLPs, pattern 4 + 1; gemma4-e4b.yml: 42 layers of 2560, 2 kv heads, MLP 10240, 18 shared, 5 + 1;
    both: head_dim 256, global 512, per-layer inputs 256 over 262144 tokens, vocab 262144 tied, eps 1e-6, window 512,
    RoPE 1e4 local, 1e6 global on a quarter of the head, final soft-cap 30, gelu (tanh)."""
    from transformers import Gemma4TextConfig

    family, cfg = registry.model(name)
    assert family is Gemma4Small and registry.family_for_config(cfg) is family
    want = {"gemma4-e2b": (1536, 1, 6144, 35, 20, True, 5), "gemma4-e4b": (2560, 2, 10240, 42, 18, False, 6)}[name]
    d = family.dims(cfg)
    first = d.layers - want[4]
    assert (d.emb, d.kv_heads, d.mlp, d.layers, d.layers - d.extra["first_shared"]) == want[:5]
    assert (d.extra["double_wide"], d.extra["period"]) == want[5:]
    assert (d.heads, d.head_dim, d.extra["global_head_dim"], d.extra["global_kv_heads"]) == (8, 256, 512, want[1])
    assert (d.extra["ple"], d.extra["ple_vocab"], d.vocab, d.tied) == (256, 262144, 262144, True)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["sliding_window"] == 512 and cfg["final_logit_softcapping"] == 30.0
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and not cfg["attention_bias"]
    hf = Gemma4TextConfig.from_dict(copy.deepcopy(cfg))
    assert hf.rope_parameters["sliding_attention"] == {"rope_theta": 10000.0, "rope_type": "default"}
    full = hf.rope_parameters["full_attention"]
    assert (full["rope_type"], full["rope_theta"], full["partial_rotary_factor"]) == ("proportional", 1e6, 0.25)
    period = want[6]
    assert hf.layer_types.count("full_attention") == 7 and hf.layer_types[period - 1] == "full_attention"
    assert hf.kv_sharing_modes[first:] == ["reuse"] * want[4] and "store" in hf.kv_sharing_modes[:first]
    assert (hf.per_layer_config[period - 1].head_dim, hf.per_layer_config[period - 1].num_key_value_heads) == (
        512,
        want[1],
    )
    assert GEMMA4_E2B["num_kv_shared_layers"] == 20 and GEMMA4_E4B["num_kv_shared_layers"] == 18


@pytest.mark.parametrize("name,arrays", [("gemma4-e2b", 540), ("gemma4-e4b", 665)])
def test_real_size_plan_is_maxtexts_whole_tree(name, arrays):
    """Every array of MaxText 0.2.5's tree (nnx.eval_shape with scan_layers=false: 540 for e2b, 665 for e4b; the
    kinds of layer as in tests/families/test_shapes.py EXPECTED), and no scanned plan."""
    from tests.families.test_shapes import EXPECTED

    family, cfg = registry.model(name)
    plan = {l.path: l.shape for l in family.plan(cfg, False)}
    assert len(plan) == arrays
    for path, shape in EXPECTED[name].items():
        assert plan[path] == shape, path
    n, first = cfg["num_hidden_layers"], cfg["num_hidden_layers"] - cfg["num_kv_shared_layers"]
    for i in range(n):
        shared = any(p.startswith(f"decoder/layers_{i}/self_attention/key") for p in plan)
        assert shared == (i < first), i
    with pytest.raises(UnsupportedModelError, match="scan"):
        family.plan(cfg, True)


def test_refused_configs(tiny_model):
    cfg = json.loads((tiny_model("gemma4-e2b") / "config.json").read_text())
    Gemma4Small.plan(cfg, scan=False)
    n = cfg["num_hidden_layers"]
    refused = [
        ({"model_type": "gemma4", "text_config": {}}, UnsupportedModelError, "multimodal"),
        ({"attention_k_eq_v": True}, UnsupportedModelError, "attention_k_eq_v"),
        ({"enable_moe_block": True, "num_experts": 8}, UnsupportedModelError, "MoE"),
        ({"use_bidirectional_attention": "all"}, UnsupportedModelError, "bidirectional"),
        ({"tie_word_embeddings": False}, MappingError, "tie_word_embeddings"),
        ({"attention_bias": True}, MappingError, "attention_bias"),
        ({"num_hidden_layers": 8, "layer_types": None}, MappingError, "4 local"),
        ({"layer_types": ["full_attention"] * n}, MappingError, "4 local"),
        ({"num_kv_shared_layers": 6}, MappingError, "earlier unshared layer"),  # no global donor before layer 4
        ({"num_kv_shared_layers": n}, MappingError, "earlier unshared layer"),
    ]
    for change, error, match in refused:
        with pytest.raises(error, match=match):
            Gemma4Small.plan({**cfg, **change}, scan=False)
