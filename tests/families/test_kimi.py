"""Kimi-K2 (moonshotai/Kimi-K2-Instruct / -Base / -Thinking; MaxText `kimi-k2-1t`): DeepSeek-V3's architecture published
under `model_type: kimi_k2` (`architectures: ["DeepseekV3ForCausalLM"]`, remote code in `auto_map`, never run). It is
detected as family deepseek3, converted with DeepSeek-V3's rules in all four directions, and exported as a
`deepseek_v3` folder (no `auto_map`) that transformers loads natively with the source's logits.

Kimi-K2-Thinking stores its routed experts as compressed-tensors int4 "pack-quantized" weights (`weight_packed`,
`weight_scale` per 32 inputs, `weight_shape`), decoded while reading (converters/io/quantized.py): a tiny Kimi whose
experts are quantized by the test-side packer below (written from the format spec, not from ckptflow's decoder) and
its dequantized bf16 twin convert to identical MaxText arrays, bit for bit.

Tiny model: the tiny DeepSeek-V3's dimensions (hidden 64, 4 heads, q_lora 48, kv_lora 32, 8 experts, 3 layers of which
the first is dense) with Kimi's ungrouped routing (n_group 1), its YaRN (factor 32, beta 1 / 1) and rope_theta 50000.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from converters import tiny_models
from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.families import moe_common
from converters.families.deepseek import KIMI_K2_THINKING_INT4_GROUP, KIMI_K2_THINKING_QUANTIZATION, DeepSeek3
from converters.io.orbax import read_params
from converters.io.safetensors import save_file
from tests.families.helpers import assert_bit_exact, deepseek_layout, hf_tensors, round_trip

LAYERS = 3
BF16 = np.dtype(ml_dtypes.bfloat16)
DIMS = {**DeepSeek3.test_models["deepseek3"][1], "n_group": 1, "topk_group": 1}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    cache: dict = {}

    def make(dtype: str = "bfloat16"):
        if dtype not in cache:
            with pytest.MonkeyPatch.context() as m:
                m.setitem(tiny_models.TINY, "kimi-k2", ("kimi-k2-1t", DIMS))
                cache[dtype] = tiny_models.make_test_model(
                    "kimi-k2", tmp_path_factory.mktemp(f"kimi-{dtype}") / "model", layers=LAYERS, dtype=dtype
                )
        return cache[dtype]

    return make


def test_published_config_is_detected_as_deepseek3(kimi):
    cfg = json.loads((kimi() / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["auto_map"]
    assert registry.family_for_config(cfg) is DeepSeek3
    fam, real = registry.model("kimi-k2-1t")
    assert fam is DeepSeek3 and real["model_type"] == "kimi_k2"
    d = fam.dims(real)
    assert (d.layers, d.heads, moe_common.experts(d), d.extra["first_dense"], d.extra["mtp_layers"]) == (
        61,
        64,
        384,
        1,
        0,
    )
    assert (real["rope_theta"], real["rope_scaling"]["factor"], real["routed_scaling_factor"]) == (50000.0, 32.0, 2.827)


@pytest.mark.parametrize(
    "scan", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scanned", "unscanned"]
)  # unscanned: the int4 test below converts and exports that layout by default
def test_stored_values_and_bit_exact_round_trips(kimi, tmp_path, scan):
    src = kimi()
    params, hf = round_trip(src, tmp_path, scan=scan)
    cfg = json.loads((src / "config.json").read_text())
    assert_bit_exact(deepseek_layout(hf, cfg, scan), params)
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    # transformers has no kimi_k2 (the repos load through their remote code): exported as the architecture it is
    assert out["model_type"] == "deepseek_v3" and out["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "auto_map" not in out
    assert cfg["rope_parameters"]["rope_theta"] == 50000.0  # transformers >= 5 saves rope_theta / scaling here
    for k in ("n_routed_experts", "first_k_dense_replace", "n_group", "rope_parameters", "routed_scaling_factor"):
        assert out[k] == cfg[k], k


@pytest.mark.slow  # a float32 model of its own (8 s)
def test_exported_folder_loads_in_transformers_with_source_logits(kimi, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    src = kimi("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    ids = torch.tensor([list(range(1, 500, 7))])
    source = {**json.loads((src / "config.json").read_text()), "model_type": "deepseek_v3"}
    source.pop("auto_map")
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, config=DeepseekV3Config(**source), dtype=torch.float32)
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        assert torch.equal(got(ids).logits, want(ids).logits)


def pack_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float `[out, in]` -> (int32 `[out, in/8]` packed codes, bf16 `[out, in/32]` scales, the bf16 dequantized values):
    symmetric round-to-nearest codes in [-8, 7], stored + 8, element k of a word in bits 4k..4k+3."""
    out_dim, in_dim = w.shape
    x = w.astype(np.float32).reshape(out_dim, in_dim // KIMI_K2_THINKING_INT4_GROUP, KIMI_K2_THINKING_INT4_GROUP)
    scale = (np.abs(x).max(axis=-1) / 7).astype(BF16)
    codes = np.clip(np.rint(x / np.maximum(scale.astype(np.float32), 1e-30)[..., None]), -8, 7).astype(np.int64)
    values = (codes * scale.astype(np.float32)[..., None]).astype(BF16).reshape(out_dim, in_dim)
    u = (codes.reshape(out_dim, in_dim // 8, 8) + 8).astype(np.uint64)
    words = (u << (4 * np.arange(8, dtype=np.uint64))).sum(axis=-1).astype(np.uint32).view(np.int32)
    return words, scale, values


@pytest.fixture(scope="module")
def int4_twins(kimi, tmp_path_factory):
    """(int4 folder as Kimi-K2-Thinking stores it, its dequantized bf16 twin) of the tiny Kimi."""
    src = kimi()
    root = tmp_path_factory.mktemp("int4")
    quantized, twin = {}, {}
    for name, t in hf_tensors(src).items():
        if ".mlp.experts." in name:
            packed, scale, values = pack_int4(t.astype(np.float32) * 3)  # wider range: more codes in play
            quantized[name + "_packed"], quantized[name + "_scale"] = packed, scale
            quantized[name + "_shape"] = np.array(t.shape, np.int32)
            twin[name] = values
        else:
            quantized[name] = twin[name] = t
    cfg = json.loads((src / "config.json").read_text())
    for folder, tensors, extra in (
        (root / "int4", quantized, {"quantization_config": KIMI_K2_THINKING_QUANTIZATION}),
        (root / "twin", twin, {}),
    ):
        folder.mkdir()
        save_file(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps({**cfg, **extra}))
    return root / "int4", root / "twin"


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_int4_source_converts_to_its_dequantized_twin(int4_twins, tmp_path, scan):
    int4, twin = int4_twins
    hf_to_maxtext(int4, tmp_path / "q", scan=scan)
    hf_to_maxtext(twin, tmp_path / "t", scan=scan)
    got, want = read_params(tmp_path / "q"), read_params(tmp_path / "t")
    assert_bit_exact(want, got)
    wi = (
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0"
        if scan
        else "decoder/moe_layers_0/DeepSeekMoeBlock_0/MoeBlock_0/wi_0"
    )
    assert len(np.unique(got[wi].astype(np.float32))) > 100  # decoded values, not a degenerate packing
    if not scan:
        maxtext_to_hf(tmp_path / "q", tmp_path / "hf")  # exported as plain bf16 deepseek_v3
        out = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert "quantization_config" not in out and out["model_type"] == "deepseek_v3"
        assert_bit_exact(hf_tensors(twin), hf_tensors(tmp_path / "hf"))
