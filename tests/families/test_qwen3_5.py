"""Qwen3.5 MoE's language model: Qwen3-Next's layers under `model.language_model.*`, scanned as MaxText 0.2.5's
`Qwen3_5ScannableBlock` stacks it (`decoder/layers/layer_<p>`, HF layers p, p + 4, ...), with the gated delta net's
unfused `in_proj_qkv` + `in_proj_z` / `in_proj_b` + `in_proj_a` (MaxText fuses them per key head) and the published
fused experts (`gate_up_proj` / `down_proj`) read as transformers' per-expert tensors.

Tiny model (`converters.tiny_models.TINY["qwen3.5-moe"]`): 8 layers (scanned: 2 blocks), hidden 64, full attention
4 x 32 with a 32-wide output gate per head, delta net 2 key heads x 16 / 4 value heads x 24, 8 experts, top-2, a
one-block vision tower (converted: tests/families/test_qwen3_5_vision.py). Every transform only moves elements: round
trips are bit-exact. Stored values are compared with a plain-numpy layout (`next_layout`: the HF tensors fused per
key head with explicit loops, then Qwen3-Next's `qwen3_next_layout`).

Checked against MaxText 0.2.5 itself (scratch scripts, not run here): its own `to_maxtext` on this tiny model in the
published layout (fused experts, bf16) gives trees bit-identical to ckptflow's, 70/70 arrays scanned and 137/137
unscanned; its abstract trees at real size match `plan` exactly (qwen3.5-35b-a3b: 70 scanned / 673 unscanned arrays;
qwen3.5-397b-a17b: 70 scanned).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import UnsupportedModelError
from converters.io.safetensors import save_file
from converters.tiny_models import make_test_model
from tests.families.helpers import assert_bit_exact, hf_tensors, qwen3_next_layout, read_params, round_trip

FAMILY, LAYERS = "qwen3.5-moe", 8
TEXT = "model.language_model."


def next_layout(hf: dict, cfg: dict, scan: bool) -> dict:
    """Qwen3.5 HF tensors -> MaxText arrays: renamed and fused as Qwen3-Next's HF tensors (per key head h:
    [q_h, k_h, v_h, z_h] and [b_h, a_h], v_h / z_h / b_h / a_h being that key head's value heads), then laid out as
    Qwen3-Next's; scanned is Qwen3-Next's `layer_<p>` layout, which is Qwen3_5ScannableBlock's."""
    t = cfg["text_config"]
    hk, hv, dk, dv = (
        t[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    )
    r = hv // hk
    out = {("model." + k[len(TEXT) :] if k.startswith(TEXT) else k): v for k, v in hf.items()}
    for i in range(t["num_hidden_layers"]):
        a = f"model.layers.{i}.linear_attn."
        if a + "in_proj_qkv.weight" not in out:
            continue
        qkv, z = out.pop(a + "in_proj_qkv.weight"), out.pop(a + "in_proj_z.weight")
        b, a_ = out.pop(a + "in_proj_b.weight"), out.pop(a + "in_proj_a.weight")
        rows, ba = [], []
        for h in range(hk):
            rows += [qkv[h * dk : (h + 1) * dk], qkv[hk * dk + h * dk : hk * dk + (h + 1) * dk]]
            rows += [qkv[2 * hk * dk + h * r * dv : 2 * hk * dk + (h + 1) * r * dv], z[h * r * dv : (h + 1) * r * dv]]
            ba += [b[h * r : (h + 1) * r], a_[h * r : (h + 1) * r]]
        out[a + "in_proj_qkvz.weight"] = np.concatenate(rows)
        out[a + "in_proj_ba.weight"] = np.concatenate(ba)
    return qwen3_next_layout(out, t, scan, legacy=scan)


def fuse_experts(hf: dict, experts: int) -> dict:
    """The published layout of the routed experts: `gate_up_proj` [X, 2F, emb], `down_proj` [X, emb, F]."""
    out = dict(hf)
    layers = {k.split(".experts.")[0] for k in hf if ".experts.0.gate_proj" in k}
    for m in layers:
        g = [out.pop(f"{m}.experts.{e}.gate_proj.weight") for e in range(experts)]
        u = [out.pop(f"{m}.experts.{e}.up_proj.weight") for e in range(experts)]
        dn = [out.pop(f"{m}.experts.{e}.down_proj.weight") for e in range(experts)]
        out[f"{m}.experts.gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(g, u)])
        out[f"{m}.experts.down_proj"] = np.stack(dn)
    return out


def write_folder(src, out, tensors: dict):
    out.mkdir(parents=True)
    shutil.copy(src / "config.json", out / "config.json")
    save_file(out / "model.safetensors", tensors)
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(dtype, tower) -> folder: transformers' tiny model; without the tower: its language model only (the config
    without vision_config, so nothing asks for model.visual.*)."""
    cache: dict = {}

    def make(dtype: str = "bfloat16", tower: bool = False):
        if (dtype, True) not in cache:
            cache[(dtype, True)] = make_test_model(
                FAMILY, tmp_path_factory.mktemp(f"q35-{dtype}") / "model", layers=LAYERS, dtype=dtype
            )
        if not tower and (dtype, False) not in cache:
            full = cache[(dtype, True)]
            text = {k: v for k, v in hf_tensors(full).items() if not k.startswith("model.visual.")}
            out = write_folder(full, tmp_path_factory.mktemp(f"q35-{dtype}-text") / "m", text)
            cfg = json.loads((out / "config.json").read_text())
            del cfg["vision_config"]
            (out / "config.json").write_text(json.dumps(cfg))
            cache[(dtype, False)] = out
        return cache[(dtype, tower)]

    return make


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scanned", "unscanned"])
def test_stored_values_and_bit_exact_round_trips(hf_model, tmp_path, scan):
    src = hf_model()
    params, hf = round_trip(src, tmp_path, scan=scan)
    assert_bit_exact(next_layout(hf, json.loads((src / "config.json").read_text()), scan), params)
    if scan:  # MaxText 0.2.5 models/qwen3_5.py Qwen3_5ScannableBlock: layer_0..3, the layer axis at 1
        assert {k.split("/")[2] for k in params if k.startswith("decoder/layers/")} == {f"layer_{p}" for p in range(4)}
        assert params["decoder/layers/layer_0/attention/in_proj_qkvz/kernel"].shape == (64, 2, 256)
        assert params["decoder/layers/layer_0/attention/conv1d/kernel"].shape == (4, 2, 1, 160)
        assert params["decoder/layers/layer_3/attention/attention/query/kernel"].shape == (64, 2, 4, 64)
        assert params["decoder/layers/layer_3/mlp/routed_experts/wo"].shape == (8, 2, 32, 64)
    else:
        assert params["decoder/layers_6/attention/in_proj_ba/kernel"].shape == (64, 8)
        assert "decoder/layers_7/attention/attention/out/kernel" in params


@pytest.mark.slow
def test_published_fused_experts_and_vision_tower(hf_model, tmp_path):
    """The published layout (fused experts, the vision tower beside the language model) converts to the text
    model's arrays plus the tower's (`vision_encoder/`); the export writes transformers' per-expert tensors and the
    tower, bit-exact."""
    full = hf_model(tower=True)
    hf = hf_tensors(full)
    published = write_folder(full, tmp_path / "pub", fuse_experts(hf, 8))
    hf_to_maxtext(published, tmp_path / "mt", scan=True)
    hf_to_maxtext(hf_model(), tmp_path / "mt_ref", scan=True)
    params = read_params(tmp_path / "mt")
    assert any(k.startswith("vision_encoder/Qwen3_5MoeVisionEncoder_0/blocks_0/") for k in params)
    assert_bit_exact(read_params(tmp_path / "mt_ref"), {k: v for k, v in params.items() if "vision_encoder" not in k})
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    assert_bit_exact(hf, hf_tensors(tmp_path / "hf"))


@pytest.mark.slow
def test_exported_folder_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_model("float32", tower=True)
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    ids = torch.tensor([list(range(1, 500, 7))])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    assert float(want.std()) > 0.5
    assert torch.equal(got, want)


# the -fp8 repos' quantized projections (MaxText's configs/models/qwen3.5-*-fp8.yml: all but the embedding, lm_head,
# router, shared_expert_gate, conv1d, in_proj_b/a, A_log, dt_bias and the norms)
FP8_QUANTIZED = ("_proj.weight", "in_proj_qkv.weight", "in_proj_z.weight")


@pytest.mark.slow
def test_fp8_source_converts_like_its_dequantized_twin(hf_model, tmp_path):
    """An FP8 folder (16x16 blocks: the tiny tensors are smaller than 128x128) converts to the checkpoint of its bf16
    twin (the decoded values), bit for bit, and verifies against the FP8 folder; the export is the twin, without
    quantization_config."""
    from tests.io.test_quantized import BF16, quantize_fp8

    src = hf_model()
    quantized, twin = {}, {}
    for name, t in hf_tensors(src).items():
        if name.endswith(FP8_QUANTIZED) and "in_proj_b" not in name and "in_proj_a" not in name:
            q, scale = quantize_fp8(t)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            full = np.repeat(np.repeat(scale, 16, 0), 16, 1)[: t.shape[0], : t.shape[1]]
            twin[name] = (q.astype(np.float32) * full).astype(BF16)
        else:
            quantized[name] = twin[name] = t
    assert (
        sum(n.endswith("_scale_inv") for n in quantized) == 8 * (3 + 8 * 3) + 6 * 3 + 2 * 4
    )  # shared + routed experts; GDN; attention
    cfg = json.loads((src / "config.json").read_text())
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [16, 16]}
    fp8 = write_folder(src, tmp_path / "fp8", quantized)
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    twin_dir = write_folder(src, tmp_path / "twin", twin)
    hf_to_maxtext(fp8, tmp_path / "a", scan=True)
    hf_to_maxtext(twin_dir, tmp_path / "b", scan=True)
    assert_bit_exact(read_params(tmp_path / "b"), read_params(tmp_path / "a"))
    maxtext_to_hf(tmp_path / "a", tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert_bit_exact(twin, hf_tensors(tmp_path / "hf"))
    from converters.verify import verify

    r = verify(maxtext=tmp_path / "a", hf=fp8)  # against the FP8 folder itself, decoded as the conversion reads it
    assert r.passed and r.data["summary"]["kl_max"] < 1e-9, r.data["summary"]


# MaxText 0.2.5's own abstract tree of qwen3.5-35b-a3b (nnx.eval_shape at real size, scan_layers=true; the 673
# unscanned arrays were compared the same way): per cycle position p, the layer axis at 1
_MT_GDN = {
    "attention/A_log": (32, 10),
    "attention/conv1d/kernel": (4, 10, 1, 8192),
    "attention/dt_bias": (32, 10),
    "attention/in_proj_ba/kernel": (2048, 10, 64),
    "attention/in_proj_qkvz/kernel": (2048, 10, 12288),
    "attention/norm/rms_norm/scale": (128, 10),
    "attention/out_proj/kernel": (4096, 10, 2048),
}
_MT_FULL = {
    "attention/attention/key/kernel": (2048, 10, 2, 256),
    "attention/attention/key_norm/scale": (256, 10),
    "attention/attention/out/kernel": (4096, 10, 2048),
    "attention/attention/query/kernel": (2048, 10, 16, 512),
    "attention/attention/query_norm/scale": (256, 10),
    "attention/attention/value/kernel": (2048, 10, 2, 256),
}
_MT_LAYER = {
    "input_layernorm/scale": (2048, 10),
    "mlp/routed_experts/gate/kernel": (2048, 10, 256),
    "mlp/routed_experts/wi_0": (256, 10, 2048, 512),
    "mlp/routed_experts/wi_1": (256, 10, 2048, 512),
    "mlp/routed_experts/wo": (256, 10, 512, 2048),
    "mlp/shared_expert/wi_0/kernel": (2048, 10, 512),
    "mlp/shared_expert/wi_1/kernel": (2048, 10, 512),
    "mlp/shared_expert/wo/kernel": (512, 10, 2048),
    "mlp/shared_expert_gate/kernel": (2048, 10, 1),
    "post_attention_layernorm/scale": (2048, 10),
}


def test_real_size_tree_is_maxtexts():
    fam, cfg = registry.model("qwen3.5-35b-a3b")
    want = {
        "decoder/decoder_norm/scale": (2048,),
        "decoder/logits_dense/kernel": (2048, 248320),
        "token_embedder/embedding": (248320, 2048),
    }
    for p in range(4):
        for k, v in {**(_MT_FULL if p == 3 else _MT_GDN), **_MT_LAYER}.items():
            want[f"decoder/layers/layer_{p}/{k}"] = v
    plan = {l.path: l.shape for l in fam.plan(cfg, scan=True)}
    # the vision tower's 441 arrays: tests/families/test_qwen3_5_vision.py
    assert {k: v for k, v in plan.items() if not k.startswith("vision_encoder/")} == want


def test_real_models_and_unsupported_variants():
    for name, (hidden, experts, value_heads) in {
        "qwen3.5-35b-a3b": (2048, 256, 32),
        "qwen3.5-397b-a17b": (4096, 512, 64),
    }.items():
        fam, cfg = registry.model(name)
        d = fam.dims(cfg)
        hf = {n: l.hf_shape for l in fam.plan(cfg, scan=False) for _, n in l.hf_names()}
        assert hf[TEXT + "layers.0.linear_attn.in_proj_qkvz.weight"] == (4096 + 2 * 128 * value_heads, hidden)
        assert (
            len([f for f in fam.hf_fusions(d) if getattr(f, "name", "").endswith("in_proj_qkvz.weight")])
            == 3 * d.layers // 4
        )
        assert fam.is_ignored(d, "mtp.layers.0.mlp.experts.3.up_proj.weight")
        assert not fam.is_ignored(d, "model.visual.blocks.0.attn.qkv.weight")  # converted
        assert d.extra["experts"] == experts
    fam, cfg = registry.model("qwen3.5-35b-a3b")
    text = cfg["text_config"]
    for bad, match in (
        ({**cfg, "quantization_config": {"quant_method": "mxfp4"}}, "FP8"),
        ({**cfg, "model_type": "qwen3_5_moe_text"}, "Qwen3_5MoeForConditionalGeneration"),
        ({**cfg, "text_config": {**text, "shared_expert_intermediate_size": 1024}}, "shared_expert"),
        ({**cfg, "text_config": {**text, "layer_types": ["full_attention"] * 40}}, "layer_types"),
    ):
        with pytest.raises(UnsupportedModelError, match=match):
            fam.plan(bad, scan=True)
    with pytest.raises(UnsupportedModelError, match="multiple of 4"):
        fam.plan({**cfg, "text_config": {**text, "num_hidden_layers": 6, "layer_types": None}}, scan=True)
