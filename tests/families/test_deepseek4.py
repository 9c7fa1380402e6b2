"""DeepSeek-V4: compressed attention (sliding / CSA with indexer / HCA layers), hyper-connections, hash-routed prefix.

Tiny model (`converters.tiny_models.TINY["deepseek4"]`, 7 layers: sliding, sliding, CSA -- the three hash-routed
ones --, then two scanned blocks [HCA 128, CSA 4]; emb 64, 4 heads x 32, q_lora 48, 2 output groups x 24, 8 experts
top-2), saved under the published DeepSeek-V4-Flash names. Every transform only moves elements: round trips are
bit-exact, the int64 `tid2eid` included. Stored values are compared with a plain-numpy layout of the HF tensors as
MaxText 0.2.5's own converter lays them out (checkpoint_conversion/utils/param_mapping.py, DEEPSEEK_V4 mapping and
hooks; `tests.families.helpers.deepseek4_layout`, which the verify tests use too).

Measured against MaxText 0.2.5 itself (its own venv, not a dependency): its `to_maxtext` on this tiny model (float32)
and ckptflow's conversion are bit-identical, 310/310 arrays unscanned and 220/220 scanned, in the same collections
(`params`, `Tid2EidVar`, `MoEBiasVar`); on DeepSeek-V4-Flash's real dimensions with 5 layers (sliding, sliding, CSA,
HCA 128, CSA) and 4 experts (random bf16, 2.27 B values) its output and ours hold the same values in all 220 arrays,
scanned and unscanned: the 76 stored bf16 by both bit for bit, the 144 ckptflow keeps in float32 (norms,
hyper-connections, sinks, position and routing biases, tid2eid) equal to MaxText's bf16 copies (MaxText 48 s / 5.9 GB
peak, ckptflow 12 s / 0.95 GB); the real-size plan of `deepseek4-284b` is MaxText's abstract tree (1930 / 220 arrays,
284.34 B; tests/families/test_shapes.py).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError, UnsupportedModelError
from converters.families.deepseek4 import DeepseekV4
from converters.io.orbax import read_params
from converters.tiny_models import rename_on_disk
from tests.families.helpers import (
    assert_bit_exact,
    deepseek4_layout,
    exported_logits,
    hf_tensors,
    model_cache,
    round_trip,
)

LAYERS = 7


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, "deepseek4", LAYERS)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_are_maxtexts_layout(hf_model, tmp_path, scan):
    src = hf_model("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype="float32")
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    want = deepseek4_layout(hf, json.loads((src / "config.json").read_text()), scan)
    assert sorted(params) == sorted(want)
    assert len(params) == (220 if scan else 310)
    bad = [k for k in want if params[k].shape != want[k].shape or not np.array_equal(params[k], want[k])]
    assert bad == []
    meta = json.loads((tmp_path / "mt" / "0" / "items" / "_METADATA").read_text())["tree_metadata"]
    roots = {tuple(json.loads(json.dumps(k.strip("()").replace("'", "").split(", ")))[:2]) for k in meta}
    assert {("params", "params"), ("params", "Tid2EidVar"), ("params", "MoEBiasVar")} <= roots
    assert any("Tid2EidVar" in k and k.endswith("'tid2eid')") for k in meta)
    assert not any("params', 'params'" in k and ("tid2eid" in k or "'gate', 'bias'" in k) for k in meta)


def test_source_holds_the_published_names(hf_model):
    names = set(hf_tensors(hf_model()))
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.attn.kv_norm.weight"} <= names
    assert "layers.0.ffn.gate.tid2eid" in names and "layers.3.ffn.gate.bias" in names
    assert not any(n.startswith("model.") for n in names)
    dtypes = {n: a.dtype for n, a in hf_tensors(hf_model()).items()}
    # transformers' float32 modules stay float32 in a bf16 folder, as in the published repo
    assert dtypes["layers.0.hc_attn_fn"] == np.float32 and dtypes["layers.3.attn.compressor.ape"] == np.float32
    assert str(dtypes["layers.0.attn.wq_a.weight"]) == "bfloat16" and dtypes["layers.0.ffn.gate.tid2eid"] == np.int64


def test_transformers_save_names_give_the_same_arrays(hf_model, tmp_path):
    """A folder as transformers' save_pretrained names it (`model.layers.*`, `model.embed_tokens`, `attn.norm`, ...)
    converts to the same arrays as the published names."""
    import shutil

    src = hf_model()
    saved = tmp_path / "saved"
    shutil.copytree(src, saved)
    inverse = {want: alt for want, alt in DeepseekV4.hf_aliases}

    def transformers_name(n: str) -> str:
        n = re.sub(r"(layers\.\d+\.attn\.)kv_norm\.weight", r"\1norm.weight", n)
        return next((alt + n[len(w) :] for w, alt in inverse.items() if n.startswith(w)), n)

    rename_on_disk(saved, transformers_name)
    assert "model.layers.0.attn.norm.weight" in hf_tensors(saved)
    hf_to_maxtext(src, tmp_path / "a", scan=True)
    hf_to_maxtext(saved, tmp_path / "b", scan=True)
    assert_bit_exact(read_params(tmp_path / "a"), read_params(tmp_path / "b"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_are_bit_exact(hf_model, tmp_path, scan, dtype):
    params, _ = round_trip(hf_model(dtype), tmp_path, scan=scan, dtype=dtype)
    # float32 whatever --dtype: what transformers keeps in float32, and tid2eid (MaxText keeps variables inexact)
    assert params["decoder/layers_0/mlp/MoeBlock_0/tid2eid"].dtype == np.float32
    assert params["decoder/layers_0/mhc_attention/res_beta"].dtype == np.float32
    assert str(params["decoder/layers_0/self_attention/wq_b/kernel"].dtype) == dtype


def test_exported_folder_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    import torch

    # 300 tokens: several 128-token HCA windows, CSA's indexer choosing among 75 compressed entries, 8-token window
    ids = [[(7 * t + 3) % 512 for t in range(300)]]
    want, got = exported_logits(hf_model("float32"), tmp_path, ids, scan=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV4ForCausalLM"] and cfg["model_type"] == "deepseek_v4"
    assert "expert_dtype" not in cfg and "quantization_config" not in cfg
    assert torch.equal(got, want)


def test_scanned_needs_maxtexts_block_pattern(hf_model, tmp_path):
    cfg = json.loads((hf_model() / "config.json").read_text())
    cfg = {**cfg, "compress_ratios": [0, 0, 4, 4, 128, 128, 4]}
    with pytest.raises(UnsupportedModelError, match=r"blocks of compress ratios \[128, 4\].*--no-scan"):
        DeepseekV4.plan(cfg, True)
    assert len(DeepseekV4.plan(cfg, False)) == 310
    with pytest.raises(UnsupportedModelError, match="compress ratio 2 has no MaxText layout"):
        DeepseekV4.plan({**cfg, "compress_ratios": [0, 2, 4, 128, 4, 128, 4]}, False)


def test_export_refuses_a_trained_mhc_norm(hf_model, tmp_path, monkeypatch):
    """MaxText's mhc_norm/scale has no HF tensor: a checkpoint where it is not all ones cannot be exported (written
    here by an import whose fill value is changed, as training would change the array)."""
    from dataclasses import replace

    from converters.families import deepseek4

    hf_to_maxtext(hf_model(), tmp_path / "mt", scan=False)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "ok")  # ones: exported
    original = deepseek4.hyper_connection
    with monkeypatch.context() as m:
        m.setattr(
            deepseek4, "hyper_connection", lambda *a: [replace(r, fill=1.5) if r.fill else r for r in original(*a)]
        )
        hf_to_maxtext(hf_model(), tmp_path / "trained", scan=False)
    assert read_params(tmp_path / "trained")["decoder/layers_5/mhc_mlp/mhc_norm/scale"][0] == 1.5
    with pytest.raises(MappingError, match="mhc_norm/scale holds values other than 1.0"):
        maxtext_to_hf(tmp_path / "trained", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_published_config_is_maxtexts_yml():
    # configs/models/deepseek4-284b.yml (MaxText 0.2.5)
    family, cfg = registry.model("deepseek4-284b")
    assert family is DeepseekV4 and registry.family_for_config(cfg) is DeepseekV4
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"]) == (
        4096,
        43,
        64,
        512,
    )
    assert (cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"], cfg["qk_rope_head_dim"]) == (1024, 8, 1024, 64)
    assert (cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"], cfg["sliding_window"]) == (
        64,
        128,
        512,
        128,
    )
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (256, 6, 2048)
    assert (cfg["num_hash_layers"], cfg["hc_mult"], cfg["vocab_size"], cfg["compress_rope_theta"]) == (
        3,
        4,
        129280,
        160000,
    )
    assert cfg["compress_ratios"][:43] == [0, 0, 4] + [128, 4] * 20  # the 44th is the MTP layer's
    d = DeepseekV4.dims(cfg)
    assert d.extra["ratios"] == cfg["compress_ratios"][:43] and d.extra["hash_layers"] == 3
