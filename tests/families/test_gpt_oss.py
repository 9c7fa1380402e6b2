"""GPT-OSS: two interleaved scanned stacks, attention biases and sinks, router bias, fused experts split and joined.

Tiny model (`converters.tiny_models.TINY["gpt-oss"]`): hidden 64 = expert MLP 64, so -- as in the published
models (2880 x 2880) -- every expert matrix is square and an orientation mistake keeps every shape; 4 heads x
head_dim 32, 4 experts, top-2, 4 layers (scanned: 2 per stack). Every transform only moves elements: round trips
are bit-exact. Stored values are compared with a plain-numpy layout of the HF tensors (even gate_up columns ->
wi_0, odd -> wi_1, down_proj as is), which is what catches a transposed or swapped expert kernel: a converter that
is consistently wrong in both directions still round-trips bit-exactly (shown below).
"""

from __future__ import annotations

import numpy as np
import pytest

from converters.convert import export_tensors, hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.core.mapping import Rule
from converters.core.transforms import Permute
from converters.errors import UnsupportedModelError
from converters.families.gpt_oss import GptOss
from converters.io.orbax import read_params
from converters.tiny_models import tiny_config
from tests.families.helpers import assert_bit_exact, bits, exported_logits, hf_tensors, model_cache, round_trip

FAMILY, LAYERS, EXPERTS = "gpt-oss", 4, 4
ATT, MLP = "GptOssAttention", "GptOssMlp"
E, N, KV, D, F = 64, 4, 2, 32, 64


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, FAMILY, LAYERS)


def expected_layer(hf: dict, i: int) -> dict:
    """MaxText arrays of HF layer i, laid out independently of the converter as MaxText's own converter lays
    them out (src/maxtext/checkpoint_conversion/standalone_scripts/convert_gpt_oss_ckpt.py in
    AI-Hypercomputer/maxtext): `gate_up_proj`
    de-interleaved, even columns to `wi_0`, odd ones to `wi_1`."""
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    gate_up, gate_up_bias = hf[m + "experts.gate_up_proj"], hf[m + "experts.gate_up_proj_bias"]
    return {
        "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        f"{ATT}/query/kernel": hf[a + "q_proj.weight"].T.reshape(E, N, D),
        f"{ATT}/query/bias": hf[a + "q_proj.bias"].reshape(N, D),
        f"{ATT}/key/kernel": hf[a + "k_proj.weight"].T.reshape(E, KV, D),
        f"{ATT}/key/bias": hf[a + "k_proj.bias"].reshape(KV, D),
        f"{ATT}/value/kernel": hf[a + "v_proj.weight"].T.reshape(E, KV, D),
        f"{ATT}/value/bias": hf[a + "v_proj.bias"].reshape(KV, D),
        f"{ATT}/out/kernel": hf[a + "o_proj.weight"].T.reshape(N, D, E),
        f"{ATT}/out/bias": hf[a + "o_proj.bias"],
        f"{ATT}/sinks": hf[a + "sinks"],
        f"{MLP}/gate/kernel": hf[m + "router.weight"].T,
        f"{MLP}/gate/bias": hf[m + "router.bias"],
        f"{MLP}/wi_0": gate_up[..., 0::2],  # [E, emb, 2F]: even columns gate, odd columns up; no transpose
        f"{MLP}/wi_1": gate_up[..., 1::2],
        f"{MLP}/wi_0_bias": gate_up_bias[..., 0::2],
        f"{MLP}/wi_1_bias": gate_up_bias[..., 1::2],
        f"{MLP}/wo": hf[m + "experts.down_proj"],  # already [E, F, emb]
        f"{MLP}/wo_bias": hf[m + "experts.down_proj_bias"],
    }


def stored_layer(params: dict, rel: str, i: int, scan: bool) -> np.ndarray:
    """HF layer i's slice: scanned stacks are decoder/layers/layers_{i % 2} at position i // 2."""
    return (
        np.take(params[f"decoder/layers/layers_{i % 2}/{rel}"], i // 2, axis=1)
        if scan
        else params[f"decoder/layers_{i}/{rel}"]
    )


def mismatches(params: dict, hf: dict, scan: bool) -> list:
    return [
        (rel, i)
        for i in range(LAYERS)
        for rel, want in expected_layer(hf, i).items()
        if not np.array_equal(bits(stored_layer(params, rel, i, scan)), bits(want))
    ]


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_at_every_expert_and_layer(hf_model, tmp_path, scan):
    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    if scan:
        assert not any(k.startswith("decoder/layers_") for k in params)
        assert params[f"decoder/layers/layers_1/{MLP}/wi_0"].shape == (EXPERTS, LAYERS // 2, E, F)
        assert params[f"decoder/layers/layers_0/{MLP}/wi_1_bias"].shape == (EXPERTS, LAYERS // 2, F)
        assert params[f"decoder/layers/layers_0/{ATT}/sinks"].shape == (N, LAYERS // 2)
    assert mismatches(params, hf, scan) == []
    assert np.array_equal(bits(params["decoder/logits_dense/kernel"]), bits(hf["lm_head.weight"].T))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_are_bit_exact(hf_model, tmp_path, scan, dtype):
    round_trip(
        hf_model(dtype), tmp_path, scan=scan, dtype=dtype
    )  # asserts both HF folders and both checkpoints bit-exact


def test_fused_experts_are_read_and_written_one_expert_at_a_time():
    cfg = tiny_config(FAMILY, layers=LAYERS)
    plan = GptOss.plan(cfg, scan=True)
    exported = {name: pieces for leaf, name, pieces in export_tensors(plan)}
    # gate_up_proj fills wi_0 and wi_1 and is written once, row (expert) by row, from both
    rows = exported["model.layers.2.mlp.experts.gate_up_proj"]
    assert [(p.row, p.index) for p in rows] == [(e, (e, 1)) for e in range(EXPERTS)]
    assert [p.row for p in exported["model.layers.3.mlp.experts.down_proj"]] == list(range(EXPERTS))
    assert sum(name.endswith("gate_up_proj") for name in exported) == LAYERS
    wi = {l.path: l for l in plan if l.path.endswith(f"{MLP}/wi_0") or l.path.endswith(f"{MLP}/wi_1")}
    assert {l.piece_shape for l in wi.values()} == {(1, 1, E, F)}


def test_a_consistently_transposed_expert_kernel_round_trips_but_values_catch_it(hf_model, tmp_path, monkeypatch):
    """Square experts: a transposed down_proj keeps every shape and even round-trips bit-exactly."""
    real = GptOss.layer_rules.__func__

    def transposed_wo(cls, d):
        return [
            Rule(r.hf, r.mt, hf_shape=r.hf_shape, mt_shape=r.mt_shape, chain=(Permute((1, 0)),), experts=r.experts)
            if r.mt == f"{MLP}/wo"
            else r
            for r in real(cls, d)
        ]

    monkeypatch.setattr(GptOss, "layer_rules", classmethod(transposed_wo))
    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    wrong = mismatches(read_params(tmp_path / "mt"), hf_tensors(src), True)
    assert wrong == [(f"{MLP}/wo", i) for i in range(LAYERS)]


def test_exported_folder_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    import json

    import torch

    # 60 tokens: past the tiny sliding window of 32
    want, got = exported_logits(hf_model("float32"), tmp_path, [list(range(1, 60, 3)) * 3], scan=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2 and "quantization_config" not in cfg
    assert torch.equal(got, want)


def test_real_models_and_unsupported_variants():
    fam, cfg = registry.model("gpt-oss-120b")
    shapes = {l.path: l.shape for l in fam.plan(cfg, scan=True)}
    assert shapes[f"decoder/layers/layers_1/{MLP}/wi_1"] == (128, 18, 2880, 2880)
    assert shapes[f"decoder/layers/layers_0/{MLP}/wo_bias"] == (128, 18, 2880)
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        fam.plan({**cfg, "layer_types": ["full_attention"] * 36}, scan=True)
    odd = {**cfg, "num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    with pytest.raises(UnsupportedModelError, match="even"):
        fam.plan(odd, scan=True)
    assert len([l for l in fam.plan(odd, scan=False) if l.path.endswith(f"{MLP}/wo")]) == 3
