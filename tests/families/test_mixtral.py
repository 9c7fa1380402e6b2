"""Mixtral: per-expert `w1/w3/w2` stacked into `MoeBlock_0/wi_0/wi_1/wo`, router, query scaled by 1/sqrt(head_dim).

Tiny model (`converters.tiny_models.TINY["mixtral"]`): hidden 64, 4 heads x head_dim 32 = 128 != hidden (the
out projection must be sized from heads x head_dim), MLP 96, 4 experts, top-2, 4 layers.

Tolerance: everything is bit-exact except the query kernel. MaxText stores q_proj times 1/sqrt(32) (not a
power of two), computed in float32 and rounded once to the stored dtype on the way in, and divided and
rounded once more on the way out: the HF query comes back within 1 ulp of its dtype, never more (measured:
1 ulp in both bfloat16 and float32). The stored query equals MaxText's own formula, round(f32(q) * f32(1/sqrt(32))).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.io.orbax import read_params
from tests.families.helpers import exported_logits, hf_tensors, model_cache

FAMILY, LAYERS, EXPERTS = "mixtral", 4, 4
MOE = "MoeBlock_0"
E, N, KV, D, F = 64, 4, 2, 32, 96


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, FAMILY, LAYERS)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    return int(np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64)).max())


def assert_close(a: dict, b: dict, scaled: str) -> int:
    """Bit-exact except names ending in `scaled` (<= 1 ulp); returns the largest ulp distance seen there."""
    assert sorted(a) == sorted(b)
    worst = 0
    for k in a:
        d = ulp_distance(a[k], b[k])
        if k.endswith(scaled):
            assert d <= 1, k
            worst = max(worst, d)
        else:
            assert d == 0, f"{k} not bit-exact"
    return worst


def expected_layer(hf: dict, i: int) -> dict:
    """MaxText arrays of HF layer i, laid out independently of the converter as MaxText's own converter lays
    them out (src/maxtext/checkpoint_conversion/standalone_scripts/llama_or_mistral_ckpt.py in
    AI-Hypercomputer/maxtext): the experts stacked
    `[E, ...]` under `MoeBlock_0`, the query kernel scaled by 1/sqrt(head_dim)."""
    p = f"model.layers.{i}."
    q = hf[p + "self_attn.q_proj.weight"]
    out = {
        "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        # MaxText's hook: f32 product with a f32 scalar, cast back to the tensor's dtype
        "self_attention/query/kernel": (q.T.reshape(E, N, D).astype(np.float32) * np.float32(1 / math.sqrt(D))).astype(
            q.dtype
        ),
        "self_attention/key/kernel": hf[p + "self_attn.k_proj.weight"].T.reshape(E, KV, D),
        "self_attention/value/kernel": hf[p + "self_attn.v_proj.weight"].T.reshape(E, KV, D),
        "self_attention/out/kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(N, D, E),
        f"{MOE}/gate/kernel": hf[p + "block_sparse_moe.gate.weight"].T,
    }
    for mt, w in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
        out[f"{MOE}/{mt}"] = np.stack([hf[f"{p}block_sparse_moe.experts.{x}.{w}.weight"].T for x in range(EXPERTS)])
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_at_every_expert_and_layer(hf_model, tmp_path, scan):
    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    if scan:
        assert params[f"decoder/layers/{MOE}/wi_1"].shape == (EXPERTS, LAYERS, E, F)
        assert params["decoder/layers/self_attention/out/kernel"].shape == (N, LAYERS, D, E)
    for i in range(LAYERS):
        for rel, want in expected_layer(hf, i).items():
            got = np.take(params[f"decoder/layers/{rel}"], i, axis=1) if scan else params[f"decoder/layers_{i}/{rel}"]
            assert got.shape == want.shape and ulp_distance(got, want) == 0, (rel, i)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_within_one_ulp_on_the_query(hf_model, tmp_path, scan, dtype):
    src = hf_model(dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)
    assert (
        assert_close(hf_tensors(src), hf_tensors(tmp_path / "hf"), "q_proj.weight") == 1
    )  # ~15% of elements move 1 ulp
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)
    assert_close(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"), "query/kernel")


def test_exported_folder_loads_in_transformers(hf_model, tmp_path):
    """Logits of the exported model agree with the source to float32 noise (the query is within 1 ulp)."""
    import torch

    want, got = exported_logits(
        hf_model("float32"), tmp_path, [[1, 5, 77, 300, 12, 499, 3, 8, 250, 100, 42, 7]], scan=False
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_query_scale_is_not_exact_but_bounded():
    """Why the query needs an ulp rule: 1/sqrt(32) is no power of two, so some bf16 values do not survive."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(4096).astype(ml_dtypes.bfloat16)
    s = np.float32(1 / math.sqrt(D))
    back = ((q.astype(np.float32) * s).astype(ml_dtypes.bfloat16).astype(np.float32) / s).astype(ml_dtypes.bfloat16)
    assert ulp_distance(q, back) == 1
