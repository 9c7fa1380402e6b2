"""Mistral reference forward (half-split RoPE, query scale baked into the kernel, optional sliding window) and
verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32, 300 tokens:
   KL < 1e-9, with and without a (binding) sliding window.
2. Converted bf16 checkpoints, scanned and unscanned, verify on the default prompts incl. the ~500-token one; a config
   with a window shorter than that prompt verifies too, with the warning that MaxText's block attends globally.
3. Llama 3.1's mapping (RoPE halves -> interleaved pairs, what MaxText's open PR wires mistral-7b to) converts and maps
   back cleanly, so content cannot see it; verify's layout check fails it on two 4-token prompts.
4. A query stored without the 1/sqrt(head_dim) factor fails content, by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.errors import UnsupportedModelError
from converters.families.llama import Llama31
from converters.families.mistral import Mistral
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from tests.verify.helpers import (
    SHORT,
    assert_fails_layout_only,
    assert_reference_matches_transformers,
    embed_and_head,
    hf_float32,
    hf_logits,
    stack_layers,
)

EXACT_KL = 1e-9
FLOAT32_MAX_KL = 1e-6  # bf16 rounding of the scaled query only


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter (half-split rows kept, q /
    sqrt(D))."""
    cfg, hf = hf_float32(folder)
    e, n, k, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layers.append(
            {
                "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
                "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
                "self_attention/query/kernel": hf[p + "self_attn.q_proj.weight"].T.reshape(e, n, d) / math.sqrt(d),
                "self_attention/key/kernel": hf[p + "self_attn.k_proj.weight"].T.reshape(e, k, d),
                "self_attention/value/kernel": hf[p + "self_attn.v_proj.weight"].T.reshape(e, k, d),
                "self_attention/out/kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(n, d, e),
                "mlp/wi_0/kernel": hf[p + "mlp.gate_proj.weight"].T,
                "mlp/wi_1/kernel": hf[p + "mlp.up_proj.weight"].T,
                "mlp/wo/kernel": hf[p + "mlp.down_proj.weight"].T,
            }
        )
    return embed_and_head(hf) | stack_layers(layers, scan)


@pytest.mark.parametrize("family", ["mistral", "mistral-window"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_reference_matches_transformers(tiny_model, family, scan):
    src = tiny_model(family, dtype="float32")
    assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)


def test_the_window_is_applied(tiny_model):
    """On 300 tokens the 32-token window changes the logits: without it the reference would not match HF."""
    src = tiny_model("mistral-window", dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    full = ReferenceModel(to_maxtext(src, True), {**cfg, "sliding_window": None}).logits(ids)
    kl = kl_per_token(hf_logits(src, ids), full)
    assert kl[:32].max() < EXACT_KL and kl.max() > 1e-3  # identical within the window, different beyond it


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(converted, scan):
    hf, ckpt = converted("mistral", scan)
    r = verify(maxtext=ckpt, hf=hf)
    assert r.passed and r.data["summary"]["kl_max"] < FLOAT32_MAX_KL, r.data["summary"]
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    assert r.data["warnings"] == []
    v = r.data["verdict"]
    assert v["content"]["passed"] and v["content"]["within_bound"] == 2  # the two query kernels
    assert v["layout"]["kl_max"] < EXACT_KL


def test_windowed_checkpoint_verifies_with_the_warning(converted):
    hf, ckpt = converted("mistral-window", True)
    r = verify(maxtext=ckpt, hf=hf)
    assert r.passed and r.data["verdict"]["layout"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert r.data["prompts"][-1]["num_tokens"] > 32  # the window binds on the long prompt
    assert any("sliding_window=32" in w and "attends globally" in w for w in r.data["warnings"])


def test_llama_mapping_fails_layout_on_a_short_prompt(tiny_model, tmp_path, monkeypatch):
    """Llama's rules interleave q/k's RoPE halves for LLaMARotaryEmbedding; MaxText runs mistral-7b with the
    half-split RotaryEmbedding. The inverse undoes the permutation, so every tensor maps back exactly; the
    reference on the checkpoint pairs the wrong dimensions and the layout check fails even on 4 tokens."""
    src = tiny_model("mistral", dtype="float32")
    monkeypatch.setattr(Mistral, "layer_rules", Llama31.layer_rules)
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    assert_fails_layout_only(tmp_path / "mt", src, tmp_path)


def test_unscaled_query_fails_content_by_name(damaged, tmp_path):
    hf, broken = damaged("mistral", "skip_query_scaling", True)
    (tmp_path / "short.jsonl").write_text(SHORT)
    r = verify(maxtext=broken, hf=hf, prompts_file=tmp_path / "short.jsonl")
    failed = {f["tensor"] for f in r.data["verdict"]["content"]["failures"]}
    assert (
        not r.passed and {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"} <= failed
    )


def test_float32_source_in_a_bfloat16_checkpoint_passes_content(tiny_model, tmp_path):
    """q x 1/sqrt(D) rounded down to a power of two: the content bound is the spacing above it, not below."""
    src = tiny_model("mistral", dtype="float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="bfloat16")
    (tmp_path / "short.jsonl").write_text(SHORT)
    r = verify(maxtext=tmp_path / "mt", hf=src, prompts_file=tmp_path / "short.jsonl")
    c = r.data["verdict"]["content"]
    assert c["passed"] and c["failed"] == 0 and c["within_bound"] == c["tensors"], c["failures"]


def test_windows_that_never_bind_and_refused_rope(tiny_model):
    from converters.verify.reference.common import hf_config_object
    from converters.verify.reference.mistral import MistralForward

    cfg = json.loads((tiny_model("mistral-window") / "config.json").read_text())
    fwd = MistralForward()
    for window, binds in ((32, True), (None, False), (cfg["max_position_embeddings"], False)):
        c = hf_config_object({**cfg, "sliding_window": window})
        assert fwd.make_spec(c).option("sliding_window") == (window if binds else 0)
        assert bool(fwd.config_warnings(c)) is binds
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4096}
    with pytest.raises(UnsupportedModelError, match="rope_type='yarn'"):
        fwd.make_spec(hf_config_object({**cfg, "rope_parameters": yarn}))


def test_content_bound_where_the_stored_query_rounded_down_to_a_power_of_two():
    """x / sqrt(32) just above 2^-9 rounds down to 2^-9 in bfloat16; mapped back and scaled again in float32 it lands
    just below 2^-9, where bfloat16's spacing is half as large. The bound must use the stored value's spacing."""
    import ml_dtypes

    from converters.core.transforms import Scale
    from converters.verify.content import compare

    s = Scale(1 / math.sqrt(32))
    x = np.array([0.011087404564023018], np.float32)
    stored = s.forward(x).astype(ml_dtypes.bfloat16)
    assert float(stored[0]) == 2.0**-9 < float(s.forward(x)[0])
    back = s.inverse(stored.astype(np.float32))
    assert float(s.forward(back)[0]) < 2.0**-9
    assert compare("q_proj.weight", "self_attention/query/kernel", x, back, (s,), np.dtype(ml_dtypes.bfloat16)).passed
