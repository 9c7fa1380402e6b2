"""Qwen3-Next: the 4-layer cycle (3 gated-delta-net layers, then full attention), scanned as MaxText 0.2.5 stacks it
(one block per cycle: `decoder/layers/local_layers` `[.., blocks, 3, ..]` and `decoder/layers/global_layer`
`[.., blocks, ..]`, MaxText src/maxtext/models/qwen3.py Qwen3NextScannableBlock), routed experts plus a gated shared
expert, in all four directions (MaxText's own export of this model is broken). Older ckptflow's scanned
`decoder/layers/layer_0..3` stacks still export.

Tiny model (`converters.tiny_models.TINY["qwen3-next"]`): 8 layers (scanned: 2 blocks), hidden 64, full
attention 4 x 32 with a 32-wide output gate per head, delta net 2 key heads x 16 / 4 value heads x 24, conv kernel 4,
8 experts, top-2. Every transform only moves elements: round trips are bit-exact. Stored values are compared with a
plain-numpy layout of the HF tensors (`tests.families.helpers.qwen3_next_layout`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import UnsupportedModelError
from converters.tiny_models import make_test_model
from tests.families.helpers import assert_bit_exact, hf_tensors, qwen3_next_layout, read_params, round_trip

FAMILY, LAYERS = "qwen3-next", 8


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cache: dict = {}

    def make(dtype: str = "bfloat16"):
        if dtype not in cache:
            cache[dtype] = make_test_model(
                FAMILY, tmp_path_factory.mktemp(f"{FAMILY}-{dtype}") / "model", layers=LAYERS, dtype=dtype
            )
        return cache[dtype]

    return make


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_stored_values_and_bit_exact_round_trips(hf_model, tmp_path, scan):
    src = hf_model()
    params, hf = round_trip(src, tmp_path, scan=scan)
    assert_bit_exact(qwen3_next_layout(hf, json.loads((src / "config.json").read_text()), scan), params)
    if scan:
        # MaxText src/maxtext/models/qwen3.py Qwen3NextScannableBlock (local_layers: nnx_scan.create_scanned_layers
        # of the linear-attention layers; global_layer), scanned per block by layers/nnx_decoders.py
        # _init_scanned_qwen3_next
        assert {k.split("/")[2] for k in params if k.startswith("decoder/layers/")} == {"local_layers", "global_layer"}
        assert params["decoder/layers/local_layers/attention/conv1d/kernel"].shape == (4, 2, 3, 1, 160)
        assert params["decoder/layers/local_layers/attention/A_log"].shape == (4, 2, 3)
        assert params["decoder/layers/local_layers/mlp/routed_experts/wo"].shape == (8, 2, 3, 32, 64)
        assert params["decoder/layers/global_layer/attention/attention/query/kernel"].shape == (64, 2, 4, 64)
        assert params["decoder/layers/global_layer/mlp/routed_experts/wo"].shape == (8, 2, 32, 64)
        assert not any("attention/attention" in k for k in params if k.startswith("decoder/layers/local_layers"))
    else:
        assert params["decoder/layers_7/attention/attention/out/kernel"].shape == (128, 64)
        assert (
            "decoder/layers_6/attention/in_proj_ba/kernel" in params
            and "decoder/layers_7/attention/in_proj_ba/kernel" not in params
        )


def test_legacy_layer_stacks_still_export(hf_model, tmp_path):
    """A scanned checkpoint in older ckptflow's layout (`decoder/layers/layer_<p>`, HF layers p, p + 4, ...) exports
    bit-exact; it is rebuilt from a current one: position p < 3 of every block is local_layers[:, :, p]."""
    import jax

    from tests.verify.helpers import restore_tree, save_tree

    src = hf_model()
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    tree = restore_tree(tmp_path / "mt")
    layers = tree["params"]["params"]["decoder"]["layers"]
    local, full = layers.pop("local_layers"), layers.pop("global_layer")
    for p in range(3):
        layers[f"layer_{p}"] = jax.tree.map(lambda x, p=p: np.ascontiguousarray(np.asarray(x)[:, :, p]), local)
    layers["layer_3"] = full
    save_tree(tree, tmp_path / "mt", tmp_path / "old")
    cfg = json.loads((src / "config.json").read_text())
    hf = hf_tensors(src)
    assert_bit_exact(qwen3_next_layout(hf, cfg, True, legacy=True), read_params(tmp_path / "old"))
    maxtext_to_hf(tmp_path / "old", tmp_path / "hf")
    assert_bit_exact(hf, hf_tensors(tmp_path / "hf"))


def test_exported_folder_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_model("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    ids = torch.tensor([list(range(1, 500, 7))])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)


def test_real_model_and_unsupported_variants():
    fam, cfg = registry.model("qwen3-next-80b-a3b")
    shapes = {l.path: l.shape for l in fam.plan(cfg, scan=True)}
    # the HF shapes MaxText's own exporter gets wrong: `QWEN3_NEXT_HF_WEIGHTS_TO_SHAPE` in MaxText's
    # src/maxtext/checkpoint_conversion/utils/hf_shape.py sizes the linear-attention value heads with the
    # full-attention head_dim (256) instead of linear_value_head_dim (128)
    hf = {name: leaf.hf_shape for leaf in fam.plan(cfg, scan=False) for _, name in leaf.hf_names()}
    assert hf["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert hf["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert hf["model.layers.0.linear_attn.out_proj.weight"] == (2048, 4096)
    assert hf["model.layers.0.linear_attn.norm.weight"] == (128,)
    # (every array of the scanned tree: tests/families/test_shapes.py)
    assert shapes["decoder/layers/local_layers/mlp/routed_experts/wi_0"] == (512, 12, 3, 2048, 512)
    assert shapes["decoder/layers/global_layer/attention/attention/query/kernel"] == (2048, 12, 16, 512)
    assert fam.is_ignored(fam.dims(cfg), "mtp.layers.0.mlp.experts.3.up_proj.weight")
    for bad in (
        {"shared_expert_intermediate_size": 1024},
        {"mlp_only_layers": [0]},
        {"layer_types": ["full_attention"] * 48},
    ):
        with pytest.raises(UnsupportedModelError):
            fam.plan({**cfg, **bad}, scan=True)
    with pytest.raises(UnsupportedModelError, match="multiple of 4"):
        fam.plan({**cfg, "num_hidden_layers": 6, "layer_types": None}, scan=True)
    assert (
        len([l for l in fam.plan({**cfg, "num_hidden_layers": 6}, scan=False) if l.path.endswith("routed_experts/wo")])
        == 6
    )
