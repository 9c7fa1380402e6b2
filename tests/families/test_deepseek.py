"""DeepSeek-V2 (V2-Lite layout: plain `query`), DeepSeek-V3 (query LoRA, routing correction bias) and DeepSeek-V3.2
(+ sparse-attention indexer): MLA kernels, separate dense / MoE stacks, stacked routed experts and shared experts, in
all
four directions. V3.2 is exported back to a `deepseek_v32` folder transformers loads with identical logits (MaxText's
own converter is HF -> MaxText only for it).

Tiny models (`converters.tiny_models.TINY["deepseek2" / "deepseek3"]`): hidden 64, 4 heads with qk_head_dim 28 and
v_head_dim 24 (so no projection is square or sized from hidden), kv_lora_rank 32, 8 routed experts, 3 layers of which
the
first is dense (scanned: a 1-deep dense stack and a 2-deep MoE stack). Every transform only moves elements: round trips
are bit-exact, including V3's float32 `e_score_correction_bias` and V3.2's float32 indexer `weights_proj`, which stay
float32 in the checkpoint and on export.
Stored values are compared with a plain-numpy layout of the HF tensors (`tests.families.helpers.deepseek_layout`).
The multi-token-prediction layer (V3) is skipped unless `with_mtp`, which writes `mtp_block/mtp_layer_1/...` and
exports it back (minus its copies of the shared embedding / head / final norm, which MaxText does not store).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import CkptflowError, MappingError, UnsupportedModelError
from converters.io.orbax import read_params
from converters.io.safetensors import save_file
from converters.tiny_models import make_test_model
from tests.families.helpers import assert_bit_exact, deepseek_layout, hf_tensors, round_trip

LAYERS = 3
FAMILIES = ("deepseek2", "deepseek3", "deepseek3.2")
BIAS = "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/gate/bias"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cache: dict = {}

    def make(family: str, dtype: str = "bfloat16"):
        if (family, dtype) not in cache:
            cache[family, dtype] = make_test_model(
                family, tmp_path_factory.mktemp(f"{family}-{dtype}") / "model", layers=LAYERS, dtype=dtype
            )
        return cache[family, dtype]

    return make


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stored_values_and_bit_exact_round_trips(hf_model, tmp_path, family, scan):
    src = hf_model(family)
    params, hf = round_trip(src, tmp_path, scan=scan)
    cfg = json.loads((src / "config.json").read_text())
    want = deepseek_layout(hf, cfg, scan)
    assert_bit_exact(want, params)
    if scan:
        assert params["decoder/dense_layers/mlp/wi_0/kernel"].shape == (64, 1, 96)
        assert params["decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0"].shape == (8, 2, 64, 32)
        assert params["decoder/moe_layers/self_attention/wkv_b/kernel"].shape == (32, 2, 4, 44)
        assert not any(k.startswith(("decoder/layers", "decoder/moe_layers_", "decoder/dense_layers_")) for k in params)
    else:
        assert params["decoder/moe_layers_1/self_attention/out/kernel"].shape == (4, 24, 64)
        assert not any(k.startswith(("decoder/moe_layers/", "decoder/dense_layers/")) for k in params)
    if family == "deepseek3.2":
        stack = "decoder/moe_layers" if scan else "decoder/moe_layers_0"
        assert params[f"{stack}/self_attention/indexer/weights_proj/kernel"].dtype == np.float32
        assert params[f"{stack}/self_attention/indexer/wq_b/kernel"].shape[-2:] == (16, 16)
    if family != "deepseek2":  # float32 in HF, in the checkpoint and back in HF, whatever --dtype says
        assert hf["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
        assert params[BIAS if scan else BIAS.replace("moe_layers", "moe_layers_0")].dtype == np.float32
        assert hf["model.layers.1.mlp.gate.weight"].dtype != np.float32
    else:
        assert "self_attention/query/kernel" in "".join(params) and "q_norm" not in "".join(params)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_folder_loads_in_transformers_with_same_logits(hf_model, tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_model(family, "float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    ids = torch.tensor([list(range(1, 500, 7))])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (
        cfg["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
        and "quantization_config" not in cfg
    )


MTP_SHARED = (
    "embed_tokens.weight",
    "shared_head.norm.weight",
    "shared_head.head.weight",
)  # MaxText uses the main model's


@pytest.fixture(scope="module")
def with_mtp_layer(hf_model, tmp_path_factory):
    """The tiny V3 plus an official-style multi-token-prediction layer `model.layers.3.*` in a second shard: a full MoE
    layer (layer 2's tensors, scaled so they differ), enorm / hnorm / eh_proj, and the shared embed / head copies."""
    import shutil

    base = hf_model("deepseek3")
    src = tmp_path_factory.mktemp("mtp") / "model"
    shutil.copytree(base, src)
    hf = hf_tensors(base)
    rng = np.random.default_rng(1)
    mtp = {
        n.replace("layers.2.", f"layers.{LAYERS}."): (t.astype(np.float32) * 1.5).astype(t.dtype)
        for n, t in hf.items()
        if n.startswith("model.layers.2.")
    }
    bf16 = hf["model.norm.weight"].dtype
    mtp |= {
        f"model.layers.{LAYERS}.enorm.weight": (1 + 0.1 * rng.standard_normal(64)).astype(bf16),
        f"model.layers.{LAYERS}.hnorm.weight": (1 + 0.1 * rng.standard_normal(64)).astype(bf16),
        f"model.layers.{LAYERS}.eh_proj.weight": (0.08 * rng.standard_normal((64, 128))).astype(bf16),
        f"model.layers.{LAYERS}.embed_tokens.weight": hf["model.embed_tokens.weight"],
        f"model.layers.{LAYERS}.shared_head.norm.weight": hf["model.norm.weight"],
        f"model.layers.{LAYERS}.shared_head.head.weight": hf["lm_head.weight"],
    }
    save_file(src / "model-mtp.safetensors", mtp)
    names = {n: "model.safetensors" for n in hf} | {n: "model-mtp.safetensors" for n in mtp}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return src


def test_mtp_layer_is_skipped_by_default_and_stray_layers_are_not(with_mtp_layer, tmp_path):
    hf_to_maxtext(with_mtp_layer, tmp_path / "mt", scan=True)
    assert not any(k.startswith("mtp_block") for k in read_params(tmp_path / "mt"))
    cfg = json.loads((with_mtp_layer / "config.json").read_text())
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(MappingError, match="unexpected tensors"):
        hf_to_maxtext(with_mtp_layer, tmp_path / "mt2", scan=True, hf_config=str(cfg_path))
    with pytest.raises(CkptflowError, match="no mtp"):
        hf_to_maxtext(with_mtp_layer, tmp_path / "mt3", scan=True, hf_config=str(cfg_path), with_mtp=True)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_with_mtp_writes_mtp_block_and_exports_it_back(with_mtp_layer, tmp_path, scan):
    hf_to_maxtext(with_mtp_layer, tmp_path / "mt", scan=scan, with_mtp=True)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(with_mtp_layer)
    cfg = json.loads((with_mtp_layer / "config.json").read_text())
    m, p = "mtp_block/mtp_layer_1/", f"model.layers.{LAYERS}."
    want = {
        f"{m}mtp_1_embedding_norm/scale": hf[p + "enorm.weight"],
        f"{m}mtp_1_hidden_state_norm/scale": hf[p + "hnorm.weight"],
        f"{m}mtp_1_projection/kernel": hf[p + "eh_proj.weight"].T,
    }
    # the transformer layer is laid out as an unscanned MoE layer: the numpy layout of a model one layer deeper
    deeper = deepseek_layout(hf, {**cfg, "num_hidden_layers": LAYERS + 1}, scan=False)
    last = f"decoder/moe_layers_{LAYERS - 1}/"
    want |= {f"{m}mtp_1_transformer_layer/{k[len(last) :]}": v for k, v in deeper.items() if k.startswith(last)}
    assert_bit_exact(want, {k: v for k, v in params.items() if k.startswith("mtp_block/")})
    assert params[f"{m}mtp_1_transformer_layer/DeepSeekMoeBlock_0/MoeBlock_0/wi_0"].shape == (8, 64, 32)
    assert params[f"{m}mtp_1_transformer_layer/DeepSeekMoeBlock_0/MoeBlock_0/gate/bias"].dtype == np.float32
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")  # the checkpoint's mtp_block is found and exported
    shared = tuple(p + n for n in MTP_SHARED)
    assert_bit_exact({k: v for k, v in hf.items() if k not in shared}, hf_tensors(tmp_path / "hf"))


def test_cli_with_mtp(with_mtp_layer, tmp_path):
    from converters.cli.main import main

    assert (
        main(["convert", str(with_mtp_layer), str(tmp_path / "mt"), "--to", "maxtext", "--no-scan", "--with-mtp", "-q"])
        == 0
    )
    assert "mtp_block/mtp_layer_1/mtp_1_projection/kernel" in read_params(tmp_path / "mt")
    manifest = json.loads(next((tmp_path / "mt").rglob("ckptflow-manifest.json")).read_text())
    assert manifest["options"]["with_mtp"] is True


def test_real_models_and_unsupported_variants():
    fam, cfg = registry.model("deepseek3-671b")
    shapes = {l.path: l.shape for l in fam.plan(cfg, scan=True)}
    assert shapes["decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0"] == (256, 58, 7168, 2048)
    assert shapes["decoder/moe_layers/self_attention/wq_b/kernel"] == (1536, 58, 128, 192)
    assert shapes["decoder/dense_layers/mlp/wi_0/kernel"] == (7168, 3, 18432)
    assert shapes[BIAS] == (256, 58)
    # 256 x 58 routed experts are read and written one (expert, layer) slice at a time: 29 MB pieces of a 1.7 TB array
    experts = [l for l in fam.plan(cfg, scan=True) if l.rule.experts]
    assert {l.piece_shape for l in experts} == {(1, 1, 7168, 2048), (1, 1, 2048, 7168)}
    assert all(len(l.pieces()) == 256 * 58 for l in experts)
    fam2, cfg2 = registry.model("deepseek2-16b")
    shapes2 = {l.path: l.shape for l in fam2.plan(cfg2, scan=False)}
    assert shapes2["decoder/moe_layers_25/self_attention/query/kernel"] == (2048, 16, 192)
    assert shapes2["decoder/moe_layers_0/DeepSeekMoeBlock_0/shared_experts/wi_0/kernel"] == (2048, 2816)
    assert shapes2["decoder/dense_layers_0/mlp/wo/kernel"] == (10944, 2048)
    for bad in ({"moe_layer_freq": 2}, {"n_shared_experts": 0}, {"first_k_dense_replace": 61}):
        with pytest.raises(UnsupportedModelError):
            fam.plan({**cfg, **bad}, scan=True)
    fam32, cfg32 = registry.model("deepseek3.2-671b")
    shapes32 = {l.path: l.shape for l in fam32.plan(cfg32, scan=False)}
    assert shapes32["decoder/moe_layers_57/self_attention/indexer/wq_b/kernel"] == (1536, 64, 128)
    assert shapes32["decoder/dense_layers_2/self_attention/indexer/weights_proj/kernel"] == (7168, 64)
    with pytest.raises(UnsupportedModelError, match="q_lora_rank"):
        fam32.plan({**cfg32, "q_lora_rank": None}, scan=True)
