"""Qwen3-MoE reference forward (q/k norms, top-k routing with norm_topk_prob) and verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32: KL < 1e-9.
2. Converted checkpoints (scanned `[E, L, ...]`, unscanned `[E, ...]`) verify on the default prompts, incl. the
   ~500-token one. Measured float32 KL max ~1.6e-13; bfloat16 ~2e-3 (the HF model's own bf16-vs-f32 distance).
3. Experts in the wrong order (router unchanged) fail verification.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.errors import UnsupportedModelError
from converters.verify import DEFAULT_MAX_KL, verify
from converters.verify.reference import ReferenceModel
from tests.families.helpers import attention_kernels, model_cache, qk_norms
from tests.verify.helpers import (
    assert_reference_matches_transformers,
    converted_cache,
    embed_and_head,
    hf_float32,
    restore_tree,
    save_tree,
    stack_layers,
)

FAMILY, LAYERS, MOE = "qwen3-moe", 4, "moe_block"
EXACT_KL = 1e-9


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, FAMILY, LAYERS)


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    return converted_cache(hf_model, tmp_path_factory, FAMILY)


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter, as MaxText's own converter lays them
    out (src/maxtext/checkpoint_conversion/standalone_scripts/convert_qwen3_moe.py in AI-Hypercomputer/maxtext): the
    routed experts stacked `[E, ...]`
    under `moe_block` (scanned `[E, L, ...]`)."""
    cfg, hf = hf_float32(folder)
    e, n, k, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    out = embed_and_head(hf)
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        lay = {
            "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
            **attention_kernels(hf, p + "self_attn.", e, n, k, d),
            **qk_norms(hf, p + "self_attn."),
            f"{MOE}/gate/kernel": hf[p + "mlp.gate.weight"].T,
        }
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            lay[f"{MOE}/{mt}"] = np.stack([hf[f"{p}mlp.experts.{x}.{name}.weight"].T for x in range(experts)])
        layers.append(lay)
    return out | stack_layers(layers, scan)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_reference_matches_transformers(hf_model, scan):
    src = hf_model("float32")
    assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(hf_model, converted, scan):
    r = verify(maxtext=converted(scan), hf=hf_model())
    assert r.passed and r.data["summary"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    if scan:
        r16 = verify(maxtext=converted(scan), hf=hf_model(), dtype="bfloat16")
        assert r16.passed and r16.data["summary"]["kl_max"] < DEFAULT_MAX_KL, r16.data["summary"]


def test_experts_out_of_order_fail_verification(hf_model, converted, tmp_path):
    src = converted(True)
    tree = restore_tree(src)
    moe = tree["params"]["params"]["decoder"]["layers"][MOE]
    for name in ("wi_0", "wi_1", "wo"):
        moe[name] = np.ascontiguousarray(moe[name][::-1])  # expert e gets expert E-1-e's weights; router unchanged
    broken = save_tree(tree, src, tmp_path / "broken")
    r = verify(maxtext=broken, hf=hf_model())
    assert not r.passed, r.data["summary"]


def test_unnormalised_top_k_is_refused():
    """HF without norm_topk_prob weights experts by their full-softmax probabilities; MaxText cannot."""
    cfg = json.loads(
        json.dumps(
            {
                "model_type": "qwen3_moe",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "num_hidden_layers": 1,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 48,
                "vocab_size": 64,
                "norm_topk_prob": False,
            }
        )
    )
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob"):
        ReferenceModel({}, cfg)
