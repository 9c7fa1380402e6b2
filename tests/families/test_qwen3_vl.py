"""Qwen3-VL's language model (`qwen3-vl-2b` / `qwen3-vl-4b` dense, `qwen3-vl-30b-a3b` MoE), multimodal layout.

Tiny models (`converters.tiny_models.TINY["qwen3-vl" / "qwen3-vl-moe"]`): hidden 64, 4 heads x head_dim 32 (!= hidden),
2 kv heads, MLP 96 (dense, tied as 2b/4b) or 4 experts of 48, top-2 (untied, as 30b-a3b), 3 layers, a tiny vision
tower under `model.visual.*`; the MoE folder stores its fused experts as the published repos do (`gate_up_proj`
`[X, 64, 96]`, `down_proj` `[X, 48, 64]`). Every transform only moves elements: all four directions (HF -> MaxText
scanned and unscanned, MaxText -> HF from either layout, back to MaxText), bfloat16 and float32, are bit-exact on every
tensor. The vision tower converts in both layouts (never scanned itself; its own tests are in
tests/families/test_qwen3_vl_vision.py). A checkpoint without the tower (MaxText use_multimodal=false) exports as
Qwen3ForCausalLM / Qwen3MoeForCausalLM.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import UnsupportedModelError
from converters.families.qwen3_vl import Qwen3VL, Qwen3VLMoe
from converters.io.orbax import read_params
from tests.families.helpers import IDS, assert_bit_exact, attention_kernels, hf_tensors, mlp_kernels, qk_norms

LAYERS, E, N, KV, D, F, X, FX = 3, 64, 4, 2, 32, 96, 4, 48
SLOW = pytest.mark.slow  # the default run keeps one case of each kind, dense and MoE between them
T = "model.language_model."
MOE = "moe_block"


def expected_layer(hf: dict, i: int, moe: bool) -> dict:
    """MaxText arrays of HF layer i laid out with numpy, independently of the converter (src/maxtext/models/qwen3.py
    names; MaxText's QWEN3_VL hook for the fused experts: gate_up_proj split in halves on its last axis)."""
    p, a = f"{T}layers.{i}.", f"{T}layers.{i}.self_attn."
    out = {
        "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        **attention_kernels(hf, a, E, N, KV, D),
        **qk_norms(hf, a),
    }
    if moe:
        gate_up = hf[p + "mlp.experts.gate_up_proj"]
        assert gate_up.shape == (X, E, 2 * FX)  # the published layout
        out[f"{MOE}/gate/kernel"] = hf[p + "mlp.gate.weight"].T
        out[f"{MOE}/wi_0"], out[f"{MOE}/wi_1"] = gate_up[..., :FX], gate_up[..., FX:]
        out[f"{MOE}/wo"] = hf[p + "mlp.experts.down_proj"]
    else:
        out |= mlp_kernels(hf, p + "mlp.")
    return out


def stored(params: dict, rel: str, i: int, scan: bool) -> np.ndarray:
    if not scan:
        return params[f"decoder/layers_{i}/{rel}"]
    a = params[f"decoder/layers/{rel}"]
    return np.take(a, i, axis=1)  # layer axis 1 (experts stay at 0)


@pytest.mark.parametrize(
    "scan, family",
    [
        (True, "qwen3-vl-moe"),
        pytest.param(False, "qwen3-vl", marks=SLOW),
        pytest.param(True, "qwen3-vl", marks=SLOW),
        pytest.param(False, "qwen3-vl-moe", marks=SLOW),
    ],
)
def test_stored_values_at_every_layer(tiny_model, tmp_path, family, scan):
    src = tiny_model(family, layers=LAYERS)
    moe = family.endswith("moe")
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    assert np.array_equal(params["token_embedder/embedding"], hf[T + "embed_tokens.weight"])
    assert np.array_equal(params["decoder/decoder_norm/scale"], hf[T + "norm.weight"])
    assert ("decoder/logits_dense/kernel" in params) == moe  # 2b/4b tie, 30b-a3b does not
    if moe:
        assert np.array_equal(params["decoder/logits_dense/kernel"], hf["lm_head.weight"].T)
        if scan:
            assert params[f"decoder/layers/{MOE}/wi_0"].shape == (X, LAYERS, E, FX)
            assert params[f"decoder/layers/{MOE}/wo"].shape == (X, LAYERS, FX, E)
    for i in range(LAYERS):
        for rel, want in expected_layer(hf, i, moe).items():
            got = stored(params, rel, i, scan)
            assert got.shape == want.shape and np.array_equal(got.view(np.uint16), want.view(np.uint16)), (rel, i)
    per_layer = len(expected_layer(hf, 0, moe))
    tower = sum(k.startswith("vision_encoder/") for k in params)
    assert len(params) == 2 + moe + (per_layer if scan else LAYERS * per_layer) + tower
    assert tower == 53  # the tiny tower's arrays, in both layouts: 3 + 2 blocks x 16 + 3 mergers x 6


@pytest.mark.parametrize(
    "scan, dtype, family",
    [
        (True, "bfloat16", "qwen3-vl-moe"),
        pytest.param(False, "float32", "qwen3-vl", marks=SLOW),
        *(
            pytest.param(scan, dtype, family, marks=SLOW)
            for scan in (True, False)
            for dtype in ("bfloat16", "float32")
            for family in ("qwen3-vl", "qwen3-vl-moe")
            if (scan, dtype, family) not in ((True, "bfloat16", "qwen3-vl-moe"), (False, "float32", "qwen3-vl"))
        ),
    ],
)
def test_round_trips_are_bit_exact(tiny_model, tmp_path, family, scan, dtype):
    src = tiny_model(family, layers=LAYERS, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)  # HF -> MaxText (scanned / unscanned)
        maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)  # MaxText (that layout, detected) -> HF
        assert_bit_exact(hf_tensors(src), hf_tensors(tmp_path / "hf"))
        hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)  # MaxText -> HF -> MaxText
    assert_bit_exact(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"))


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=SLOW)], ids=["scanned", "unscanned"])
def test_restores_with_plain_orbax_in_maxtext_layout(tiny_model, tmp_path, scan):
    import orbax.checkpoint as ocp

    src = tiny_model("qwen3-vl-moe", layers=LAYERS)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())["params"]["params"]
    assert set(tree) == {"token_embedder", "decoder", "vision_encoder"}
    cfg = json.loads((src / "config.json").read_text())
    plan = {leaf.path: leaf.shape for leaf in Qwen3VLMoe.plan(cfg, scan)}
    assert {k: v.shape for k, v in read_params(tmp_path / "mt").items()} == plan
    layer = tree["decoder"]["layers" if scan else "layers_0"]
    assert set(layer) == {
        "pre_self_attention_layer_norm",
        "self_attention",
        "post_self_attention_layer_norm",
        MOE,
    }
    assert set(layer[MOE]) == {"gate", "wi_0", "wi_1", "wo"}
    assert set(tree["decoder"]) >= {"decoder_norm", "logits_dense"}


def _logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = json.loads((folder / "config.json").read_text())
    auto = AutoModelForImageTextToText if "text_config" in cfg else AutoModelForCausalLM
    with torch.no_grad():
        return auto.from_pretrained(folder, dtype=torch.float32)(torch.tensor(ids)).logits


@pytest.mark.parametrize("family", [pytest.param("qwen3-vl", marks=SLOW), "qwen3-vl-moe"])
def test_exported_folder_loads_in_transformers_with_the_same_logits(tiny_model, tmp_path, family):
    """The unscanned export (with the vision tower) is the source's Qwen3VL(Moe)ForConditionalGeneration config;
    transformers gives the source's text logits bit for bit (image prompts: test_qwen3_vl_vision.py)."""
    import torch
    from transformers import AutoConfig

    src = tiny_model(family, layers=LAYERS, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
        maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    assert torch.equal(_logits(tmp_path / "hf", IDS), _logits(src, IDS))
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(a) is type(b) and a.model_type == b.model_type
    assert a.tie_word_embeddings == b.tie_word_embeddings == (family == "qwen3-vl")
    ta, tb = a.get_text_config(), b.get_text_config()
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters"):
        assert getattr(ta, key) == getattr(tb, key), key
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    assert exported["dtype"] == exported["text_config"]["dtype"] == "float32"
    assert (tmp_path / "hf" / "generation_config.json").exists()


@pytest.mark.parametrize("family", ["qwen3-vl", pytest.param("qwen3-vl-moe", marks=SLOW)])
def test_checkpoint_without_vision_tower_exports_the_text_model(tiny_model, tmp_path, family, monkeypatch):
    """A checkpoint lacking the tower (MaxText use_multimodal=false; written here with the tower switched off)
    exports as Qwen3ForCausalLM / Qwen3MoeForCausalLM (per-expert tensors), which computes the same text logits."""
    import torch

    src = tiny_model(family, layers=LAYERS, dtype="float32")
    with monkeypatch.context() as m, warnings.catch_warnings():
        m.setattr(registry.family(family), "vision_tower", False)
        warnings.simplefilter("ignore", UserWarning)
        hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    with pytest.warns(UserWarning, match="writing the text model only"):
        maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    want_arch = "Qwen3MoeForCausalLM" if family.endswith("moe") else "Qwen3ForCausalLM"
    assert exported["architectures"] == [want_arch] and "text_config" not in exported
    assert exported["rope_theta"] == 5000000 and exported["tie_word_embeddings"] == (family == "qwen3-vl")
    names = set(hf_tensors(tmp_path / "hf"))
    assert all(n.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head")) for n in names)
    if family.endswith("moe"):
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    torch.testing.assert_close(_logits(tmp_path / "hf", IDS), _logits(src, IDS), rtol=1e-5, atol=1e-5)


@SLOW
def test_untied_dense_variant_round_trips(tiny_model, tmp_path):
    src = tiny_model("qwen3-vl", layers=2, tied=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf_to_maxtext(src, tmp_path / "mt", scan=True)
        maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    assert "decoder/logits_dense/kernel" in read_params(tmp_path / "mt")
    assert_bit_exact(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_published_configs_are_maxtexts_ymls():
    """configs/models/qwen3-vl-{2b,4b,30b-a3b}.yml: head_dim 128, vocab 151936, eps 1e-6, rope_max_timescale 5e6,
    mrope_section [24, 20, 20]; 2b 28 x 2048 (16 heads, 8 kv, MLP 6144), 4b 36 x 2560 (32, 8, 9728), both tied;
    30b-a3b 48 x 2048 (32 heads, 4 kv), 128 experts of 768, top-8, norm_topk_prob, untied."""
    want = {
        "qwen3-vl-2b": (Qwen3VL, 2048, 16, 8, 6144, 28, True),
        "qwen3-vl-4b": (Qwen3VL, 2560, 32, 8, 9728, 36, True),
        "qwen3-vl-30b-a3b": (Qwen3VLMoe, 2048, 32, 4, 768, 48, False),
    }
    for name, (family, emb, heads, kv, mlp, layers, tied) in want.items():
        fam, cfg = registry.model(name)
        assert fam is family and registry.family_for_config(cfg) is family
        d = fam.dims(cfg)
        assert (d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp, d.layers, d.vocab, d.tied) == (
            emb,
            heads,
            kv,
            128,
            mlp,
            layers,
            151936,
            tied,
        )
        t = cfg["text_config"]
        assert t["rms_norm_eps"] == 1e-6 and t["rope_theta"] == 5000000 and t["hidden_act"] == "silu"
        assert t["rope_scaling"]["mrope_section"] == [24, 20, 20] and t["rope_scaling"]["mrope_interleaved"]
        assert cfg["vision_config"]["out_hidden_size"] == emb
    d = Qwen3VLMoe.dims(registry.model("qwen3-vl-30b-a3b")[1])
    assert (d.extra["experts"], d.extra["top_k"]) == (128, 8)


def test_refuses_what_it_cannot_convert():
    cfg = registry.model("qwen3-vl-2b")[1]
    text = {**cfg["text_config"], "architectures": ["Qwen3VLTextModel"]}
    with pytest.raises(UnsupportedModelError, match="headless"):
        Qwen3VL.plan(text, scan=True)
    bad = {**cfg, "text_config": {**cfg["text_config"], "attention_bias": True}}
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        Qwen3VL.plan(bad, scan=True)
    moe = registry.model("qwen3-vl-30b-a3b")[1]
    for change in ({"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}):
        with pytest.raises(UnsupportedModelError):
            Qwen3VLMoe.plan({**moe, "text_config": {**moe["text_config"], **change}}, scan=True)


@SLOW
def test_transformers_5_expert_layout_converts_and_exports_in_its_own_layout(tiny_model, tmp_path):
    """transformers >= 5 saves the fused experts transposed (`gate_up_proj` `[X, 2F, emb]`, `down_proj` `[X, emb, F]`)
    with its version in config.json: the same MaxText arrays as the published layout, exported back bit for bit in
    the folder's own layout; a published-layout folder claiming transformers 5 is refused by the shape check."""
    import shutil

    from safetensors.torch import load_file, save_file

    from converters.errors import MappingError

    src = tiny_model("qwen3-vl-moe", layers=2)
    t5 = tmp_path / "t5"
    shutil.copytree(src, t5)
    cfg = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**cfg, "transformers_version": "5.24.0"}))
    for f in t5.glob("*.safetensors"):
        tensors = load_file(f)
        fused = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
        save_file({k: v.transpose(1, 2).contiguous() if k.endswith(fused) else v for k, v in tensors.items()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf_to_maxtext(src, tmp_path / "mt", scan=True)
        hf_to_maxtext(t5, tmp_path / "mt5", scan=True)
        assert_bit_exact(read_params(tmp_path / "mt"), read_params(tmp_path / "mt5"))
        maxtext_to_hf(tmp_path / "mt5", tmp_path / "back")
    back = hf_tensors(tmp_path / "back")
    assert back[T + "layers.1.mlp.experts.gate_up_proj"].shape == (X, 2 * FX, E)
    assert_bit_exact(hf_tensors(t5), back)
    (tmp_path / "lying").mkdir()
    for f in src.iterdir():
        shutil.copy(f, tmp_path / "lying" / f.name)
    (tmp_path / "lying" / "config.json").write_text(json.dumps({**cfg, "transformers_version": "5.0.0"}))
    with pytest.raises(MappingError, match="gate_up_proj"):
        hf_to_maxtext(tmp_path / "lying", tmp_path / "mt6", scan=True)
