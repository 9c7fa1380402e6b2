"""Qwen3-MoE: per-expert HF tensors stacked into `[E, ...]` / `[E, L, ...]`, router, q/k norms; both directions.

Tiny model (`converters.tiny_models.TINY["qwen3-moe"]`): hidden 64, 4 heads x head_dim 32 (heads x head_dim !=
hidden), expert MLP 48, 4 experts, top-2, 4 layers. Every transform only moves elements, so every round trip
is bit-exact. Stored values are checked against a plain-numpy layout of the HF tensors at every (expert, layer)
-- expert 2 of layer 1 must not land at expert 1 of layer 2 -- and the expert arrays are written one
(expert, layer) slice at a time into chunks of exactly that slice.
"""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest

from converters.convert import hf_to_maxtext
from converters.convert.to_maxtext import array_units
from converters.core import registry
from converters.errors import UnsupportedModelError
from converters.io.orbax import read_params
from converters.io.safetensors import SafetensorsFolder
from converters.tiny_models import tiny_config
from tests.families.helpers import bits, exported_logits, hf_tensors, model_cache, round_trip

FAMILY, LAYERS, EXPERTS = "qwen3-moe", 4, 4
MOE = "moe_block"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_cache(tmp_path_factory, FAMILY, LAYERS)


def expected_layer(hf: dict, i: int) -> dict:
    """MaxText arrays of HF layer i, laid out independently of the converter as MaxText's own converter lays
    them out (src/maxtext/checkpoint_conversion/standalone_scripts/convert_qwen3_moe.py in AI-Hypercomputer/maxtext):
    the routed experts stacked
    `[E, ...]` under `moe_block`."""
    p = f"model.layers.{i}."
    q, k = hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"]
    e, n, kv, d = 64, 4, 2, 32
    out = {
        "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
        "self_attention/query/kernel": q.T.reshape(e, n, d),
        "self_attention/key/kernel": k.T.reshape(e, kv, d),
        "self_attention/value/kernel": hf[p + "self_attn.v_proj.weight"].T.reshape(e, kv, d),
        "self_attention/out/kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(n, d, e),
        "self_attention/query_norm/scale": hf[p + "self_attn.q_norm.weight"],
        "self_attention/key_norm/scale": hf[p + "self_attn.k_norm.weight"],
        f"{MOE}/gate/kernel": hf[p + "mlp.gate.weight"].T,
    }
    for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        out[f"{MOE}/{mt}"] = np.stack([hf[f"{p}mlp.experts.{x}.{name}.weight"].T for x in range(EXPERTS)])
    return out


def stored_layer(params: dict, rel: str, i: int, scan: bool) -> np.ndarray:
    return np.take(params[f"decoder/layers/{rel}"], i, axis=1) if scan else params[f"decoder/layers_{i}/{rel}"]


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_at_every_expert_and_layer(hf_model, tmp_path, scan):
    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    params, hf = read_params(tmp_path / "mt"), hf_tensors(src)
    if scan:
        assert params[f"decoder/layers/{MOE}/wi_0"].shape == (EXPERTS, LAYERS, 64, 48)
        assert params[f"decoder/layers/{MOE}/wo"].shape == (EXPERTS, LAYERS, 48, 64)
        assert params[f"decoder/layers/{MOE}/gate/kernel"].shape == (64, LAYERS, EXPERTS)
    for i in range(LAYERS):
        for rel, want in expected_layer(hf, i).items():
            got = stored_layer(params, rel, i, scan)
            assert got.shape == want.shape and np.array_equal(bits(got), bits(want)), (rel, i)
    assert np.array_equal(params["decoder/logits_dense/kernel"], hf["lm_head.weight"].T)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trips_are_bit_exact(hf_model, tmp_path, scan, dtype):
    round_trip(
        hf_model(dtype), tmp_path, scan=scan, dtype=dtype
    )  # asserts both HF folders and both checkpoints bit-exact


def test_experts_are_written_one_expert_layer_slice_at_a_time(hf_model, tmp_path):
    """No [E, L, ...] array is ever built: each piece is one expert of one layer, stored in chunks of that slice."""
    src = hf_model()
    cfg = tiny_config(FAMILY, layers=LAYERS)
    family = registry.family_for_config(cfg)
    folder = SafetensorsFolder(src)
    leaves = [l for l in family.plan(cfg, scan=True) if l.rule.experts]
    assert {l.path for l in leaves} == {f"decoder/layers/{MOE}/{n}" for n in ("wi_0", "wi_1", "wo")}
    for leaf in leaves:
        units, chunk = array_units(leaf, folder, np.dtype(np.float32), {})
        seen = set()
        for index, block in ((u.index, u.produce()) for u in units):
            assert len(index) == 2 and all(isinstance(i, int) for i in index) and block.shape == leaf.shape[2:]
            seen.add(index)
        assert seen == {(e, l) for e in range(EXPERTS) for l in range(LAYERS)}
        assert chunk == (1, 1) + leaf.shape[2:]
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    meta = ocp.PyTreeCheckpointer().metadata(tmp_path / "mt" / "0" / "items").item_metadata.tree
    wo = meta["params"]["params"]["decoder"]["layers"][MOE]["wo"]
    assert wo.shape == (EXPERTS, LAYERS, 48, 64) and wo.storage.chunk_shape == (1, 1, 48, 64)


def test_exported_folder_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    import torch

    want, got = exported_logits(
        hf_model("float32"), tmp_path, [[1, 5, 77, 300, 12, 499, 3, 8, 250, 100, 42, 7]], scan=True
    )
    assert torch.equal(got, want)


def test_real_models_and_unsupported_variants():
    fam, cfg = registry.model("qwen3-480b-a35b")  # MaxText's converter cannot find this name; ours plans it
    assert fam.name == FAMILY
    shapes = {l.path: l.shape for l in fam.plan(cfg, scan=False)}
    assert shapes[f"decoder/layers_61/{MOE}/wi_1"] == (160, 6144, 2560)
    for bad in ({"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}, {"shared_expert_intermediate_size": 512}):
        with pytest.raises(UnsupportedModelError):
            fam.plan({**cfg, **bad}, scan=True)
