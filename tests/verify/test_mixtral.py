"""Mixtral reference forward (query scale baked into the kernel, top-2 routing, optional sliding window) and
verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32: KL < 1e-9
   (the numpy layout scales the query in float32, so no rounding is involved).
2. Converted bf16 checkpoints (scanned and unscanned) verify on the default prompts incl. the ~500-token one.
   Measured float32 KL max ~7e-8: the stored query is q / sqrt(32) rounded to bf16, while HF multiplies the
   unrounded bf16 q; bfloat16 ~1.4e-2 on the long prompt, the same as the HF model's own bf16-vs-f32 distance.
3. A query stored without the 1/sqrt(head_dim) factor fails verification.
4. `sliding_window` set in config.json: the reference applies it like HF (and warns that MaxText's mixtral
   block would not); the tiny window of 16 changes the long prompt's logits, so it is really exercised.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.io.orbax import read_params
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from tests.families.helpers import model_cache
from tests.verify.helpers import (
    assert_reference_matches_transformers,
    converted_cache,
    embed_and_head,
    hf_float32,
    hf_logits,
    restore_tree,
    save_tree,
    stack_layers,
)

FAMILY, LAYERS, MOE = "mixtral", 4, "MoeBlock_0"
EXACT_KL = 1e-9
FLOAT32_MAX_KL = 1e-6  # bf16 rounding of the scaled query only


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, FAMILY, LAYERS)


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    return converted_cache(hf_model, tmp_path_factory, FAMILY)


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter, as MaxText's own converter lays them
    out (src/maxtext/checkpoint_conversion/standalone_scripts/llama_or_mistral_ckpt.py in AI-Hypercomputer/maxtext):
    the experts stacked `[E, ...]`
    under `MoeBlock_0` (scanned `[E, L, ...]`), the query kernel scaled by 1/sqrt(head_dim)."""
    cfg, hf = hf_float32(folder)
    e, n, k, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    out = embed_and_head(hf)
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        lay = {
            "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
            "self_attention/query/kernel": hf[p + "self_attn.q_proj.weight"].T.reshape(e, n, d) / math.sqrt(d),
            "self_attention/key/kernel": hf[p + "self_attn.k_proj.weight"].T.reshape(e, k, d),
            "self_attention/value/kernel": hf[p + "self_attn.v_proj.weight"].T.reshape(e, k, d),
            "self_attention/out/kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(n, d, e),  # [heads, head_dim, emb]
            f"{MOE}/gate/kernel": hf[p + "block_sparse_moe.gate.weight"].T,
        }
        for mt, w in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
            lay[f"{MOE}/{mt}"] = np.stack(
                [hf[f"{p}block_sparse_moe.experts.{x}.{w}.weight"].T for x in range(cfg["num_local_experts"])]
            )
        layers.append(lay)
    return out | stack_layers(layers, scan)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_reference_matches_transformers(hf_model, scan):
    src = hf_model("float32")
    assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(hf_model, converted, scan):
    r = verify(maxtext=converted(scan), hf=hf_model())
    assert r.passed and r.data["summary"]["kl_max"] < FLOAT32_MAX_KL, r.data["summary"]
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    assert r.data["warnings"] == []


def test_unscaled_query_fails_verification(hf_model, converted, tmp_path):
    src = converted(True)
    tree = restore_tree(src)
    query = tree["params"]["params"]["decoder"]["layers"]["self_attention"]["query"]
    query["kernel"] = (query["kernel"].astype(np.float32) * math.sqrt(32)).astype(query["kernel"].dtype)
    broken = save_tree(tree, src, tmp_path / "broken")
    r = verify(maxtext=broken, hf=hf_model())
    assert not r.passed, r.data["summary"]


def test_configured_sliding_window(hf_model, tmp_path):
    windowed = tmp_path / "hf"
    shutil.copytree(hf_model(), windowed)
    cfg = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    hf_to_maxtext(windowed, tmp_path / "mt", scan=True)
    r = verify(maxtext=tmp_path / "mt", hf=windowed)
    assert r.passed and r.data["summary"]["kl_max"] < FLOAT32_MAX_KL, r.data["summary"]
    assert any("sliding_window=16" in w and "attends globally" in w for w in r.data["warnings"])
    # the window matters: without it the same weights give other logits on a long prompt
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=200)]
    params = read_params(tmp_path / "mt")
    full = ReferenceModel(params, cfg).logits(ids)
    assert kl_per_token(hf_logits(windowed, ids), full).max() > 1e-3
