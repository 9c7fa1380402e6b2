"""Qwen3-MoE reference forward (q/k norms, top-k routing with norm_topk_prob) and verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32: KL < 1e-9.
2. Converted checkpoints (scanned `[E, L, ...]`, unscanned `[E, ...]`) verify on the default prompts, incl. the
   ~500-token one. Measured float32 KL max ~1.6e-13; bfloat16 ~2e-3 (the HF model's own bf16-vs-f32 distance).
3. Experts in the wrong order (router unchanged) fail verification.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.errors import UnsupportedModelError
from converters.safetensors_io import SafetensorsFolder
from converters.test_models import make_test_model
from converters.verify import DEFAULT_MAX_KL, verify
from converters.verify.jax_ref import ReferenceModel
from converters.verify.metrics import kl_per_token

FAMILY, LAYERS, MOE = "qwen3-moe", 4, "moe_block"
EXACT_KL = 1e-9


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cache: dict = {}

    def make(dtype: str = "bfloat16"):
        if dtype not in cache:
            cache[dtype] = make_test_model(FAMILY, tmp_path_factory.mktemp(f"{FAMILY}-{dtype}") / "model", layers=LAYERS, dtype=dtype)
        return cache[dtype]

    return make


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    cache: dict = {}

    def make(scan: bool):
        if scan not in cache:
            out = tmp_path_factory.mktemp(f"{FAMILY}-{scan}") / "ckpt"
            hf_to_maxtext(hf_model(), out, scan=scan)
            cache[scan] = out
        return cache[scan]

    return make


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter (maxtext-format-moe.md §3)."""
    cfg = json.loads((folder / "config.json").read_text())
    f = SafetensorsFolder(folder)
    hf = {n: f.read(n).astype(np.float32) for n in f.tensors}
    e, n, k, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    out = {"token_embedder/embedding": hf["model.embed_tokens.weight"], "decoder/decoder_norm/scale": hf["model.norm.weight"],
           "decoder/logits_dense/kernel": hf["lm_head.weight"].T}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        lay = {
            "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
            "self_attention/query/kernel": hf[p + "self_attn.q_proj.weight"].T.reshape(e, n, d),
            "self_attention/key/kernel": hf[p + "self_attn.k_proj.weight"].T.reshape(e, k, d),
            "self_attention/value/kernel": hf[p + "self_attn.v_proj.weight"].T.reshape(e, k, d),
            "self_attention/out/kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(n, d, e),
            "self_attention/query_norm/scale": hf[p + "self_attn.q_norm.weight"],
            "self_attention/key_norm/scale": hf[p + "self_attn.k_norm.weight"],
            f"{MOE}/gate/kernel": hf[p + "mlp.gate.weight"].T,
        }
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            lay[f"{MOE}/{mt}"] = np.stack([hf[f"{p}mlp.experts.{x}.{name}.weight"].T for x in range(experts)])
        layers.append(lay)
    if scan:
        out.update({f"decoder/layers/{key}": np.stack([lay[key] for lay in layers], axis=1) for key in layers[0]})
    else:
        out.update({f"decoder/layers_{i}/{key}": v for i, lay in enumerate(layers) for key, v in lay.items()})
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_reference_matches_transformers(hf_model, scan):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_model("float32")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    ref = ReferenceModel(to_maxtext(src, scan), json.loads((src / "config.json").read_text()))
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    assert float(np.std(hf)) > 0.5
    assert kl_per_token(hf, ref.logits(ids)).max() < EXACT_KL


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(hf_model, converted, scan):
    r = verify(maxtext=converted(scan), hf=hf_model())
    assert r.passed and r.data["summary"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    if scan:
        r16 = verify(maxtext=converted(scan), hf=hf_model(), dtype="bfloat16")
        assert r16.passed and r16.data["summary"]["kl_max"] < DEFAULT_MAX_KL, r16.data["summary"]


def test_experts_out_of_order_fail_verification(hf_model, converted, tmp_path):
    import orbax.checkpoint as ocp

    src = converted(True)
    tree = ocp.PyTreeCheckpointer().restore((src / "0" / "items").absolute())
    moe = tree["params"]["params"]["decoder"]["layers"][MOE]
    for name in ("wi_0", "wi_1", "wo"):
        moe[name] = np.ascontiguousarray(moe[name][::-1])  # expert e gets expert E-1-e's weights; router unchanged
    tree.pop("opt_state", None)
    broken = tmp_path / "broken"
    ocp.PyTreeCheckpointer().save((broken / "0" / "items").absolute(), tree)
    shutil.copytree(src / "ckptflow", broken / "ckptflow")
    r = verify(maxtext=broken, hf=hf_model())
    assert not r.passed, r.data["summary"]


def test_unnormalised_top_k_is_refused():
    """HF without norm_topk_prob weights experts by their full-softmax probabilities; MaxText cannot."""
    cfg = json.loads(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 32, "num_hidden_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 48, "vocab_size": 64, "norm_topk_prob": False}))
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob"):
        ReferenceModel({}, cfg)
