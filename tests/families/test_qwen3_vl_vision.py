"""Qwen3-VL's vision tower (converters/families/qwen3_vl_vision.py): stored values in MaxText's layout, bit-exact
round trips, MaxText's real-size tree, and the configs it refuses. The tower standalone, on transformers'
`Qwen3VLVisionModel`; the multimodal family's own tests cover it inside whole checkpoints."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import torch

from converters.core.mapping import Dims, Family
from converters.errors import MappingError
from converters.families import qwen3_vl_vision as tower
from tests.families.helpers import bits, hf_tensors, model_cache, round_trip

# the tiny tower: head_dim 16 (4 rotary frequencies per axis), a 6x6 position grid, deepstack after blocks 0 and 2
TINY = {
    "depth": 3,
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 96,
    "in_channels": 3,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 48,
    "num_position_embeddings": 36,
    "deepstack_visual_indexes": [0, 2],
}
PUBLISHED = {  # the vision_config of Qwen/Qwen3-VL-{2B,4B,30B-A3B}-Instruct (MaxText's hf_model_configs.py too)
    "qwen3-vl-2b": {
        **TINY,
        "depth": 24,
        "hidden_size": 1024,
        "num_heads": 16,
        "intermediate_size": 4096,
        "patch_size": 16,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
    "qwen3-vl-30b-a3b": {
        **TINY,
        "depth": 27,
        "hidden_size": 1152,
        "num_heads": 16,
        "intermediate_size": 4304,
        "patch_size": 16,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
}
PUBLISHED["qwen3-vl-4b"] = {**PUBLISHED["qwen3-vl-2b"], "out_hidden_size": 2560}  # 2b's tower, 4b's width


def _maxtext_tower(width: int, mlp: int, out: int, heads: int = 16) -> dict:
    """One block's arrays (`blocks_N`, the same in every block), the three deepstack mergers and the final one, at a
    merger width of 4 x `width` (2x2 patches merged)."""
    d, m = width // heads, 4 * width
    e = "E/blocks_N/"
    shapes = {e + f"attn/attn/{k}/kernel": (width, heads, d) for k in ("query", "key", "value")}
    shapes |= {e + f"attn/attn/{k}/bias": (heads, d) for k in ("query", "key", "value")}
    shapes |= {e + "attn/attn/out/kernel": (heads, d, width), e + "attn/attn/out/bias": (width,)}
    shapes |= {e + f"{ln}/{k}": (width,) for ln in ("ln1", "ln2") for k in ("bias", "scale")}
    shapes |= {e + "mlp/kernel": (width, mlp), e + "mlp/bias": (mlp,)}
    shapes |= {e + "mlp_out/kernel": (mlp, width), e + "mlp_out/bias": (width,)}
    for merger, ln in (*((f"E/merger_{i}/", m) for i in range(3)), ("P/merger/", width)):
        shapes |= {merger + "ln_q/bias": (ln,), merger + "ln_q/scale": (ln,)}
        shapes |= {merger + "mlp_0/kernel": (m, m), merger + "mlp_0/bias": (m,)}
        shapes |= {merger + "mlp_2/kernel": (m, out), merger + "mlp_2/bias": (out,)}
    shapes |= {"E/patch_embed/proj/kernel": (2, 16, 16, 3, width), "E/patch_embed/proj/bias": (width,)}
    return shapes | {"E/pos_embed_interpolate/pos_embed": (2304, width)}


# MaxText 0.2.5's own tree (create_nnx_abstract_model, use_multimodal=true, scan_layers=false), the tower's arrays
# (count, shapes): E/ = vision_encoder/Qwen3VLVisionEncoder_0/, P/ = vision_encoder/Qwen3VLVisionProjector_0/
MAXTEXT_TOWER = {
    "qwen3-vl-2b": (411, _maxtext_tower(1024, 4096, 2048)),
    "qwen3-vl-4b": (411, _maxtext_tower(1024, 4096, 2560)),
    "qwen3-vl-30b-a3b": (459, _maxtext_tower(1152, 4304, 2048)),
}


class Tower(Family):
    """The tower alone, as a plan (not registered: the Qwen3-VL family carries it)."""

    name = "qwen3-vl-vision"

    @classmethod
    def dims(cls, cfg):
        return Dims(
            emb=0,
            heads=0,
            kv_heads=0,
            head_dim=0,
            mlp=0,
            vocab=0,
            layers=0,
            tied=True,
            extra={"v": tower.vision_dims(cfg)},
        )

    @classmethod
    def global_rules(cls, d):
        return tower.vision_rules(d.extra["v"])

    @classmethod
    def layer_groups(cls, d, scan):
        return tower.vision_groups(d.extra["v"])


def tiny_tower(seed: int = 0) -> dict:
    """HF tensors of a random tiny Qwen3VLVisionModel, float32, named as in the published checkpoints."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(seed)
    m = Qwen3VLVisionModel(Qwen3VLVisionConfig(**TINY))
    return {tower.HF + k: v.detach().float().numpy().copy() for k, v in m.state_dict().items()}


def to_maxtext(hf: dict, dtype=np.float32) -> dict:
    out = {}
    for leaf in Tower.plan(TINY, scan=False):
        x = hf[leaf.hf_name(leaf.hf_layer)]
        out[leaf.path] = leaf.rule.to_maxtext(x.astype(dtype), dtype, leaf.split_index)
        assert out[leaf.path].shape == leaf.shape, leaf.path
    return out


def to_hf(mt: dict, dtype=np.float32) -> dict:
    out = {}
    for leaf in Tower.plan(TINY, scan=False):
        if leaf.split_index == 0:
            pieces = [mt[p] for p in (leaf.split_paths or (leaf.path,))]
            out[leaf.hf_name(leaf.hf_layer)] = leaf.rule.to_hf(pieces, dtype)
    return out


def maxtext_hooks(
    hf: dict, vision: dict = TINY, *, encoder: str = tower.ENCODER, projector: str = tower.PROJECTOR
) -> dict:
    """The tower as MaxText 0.2.5's converter lays it out (param_mapping.py QWEN3_VL_..._HOOK_FN; QWEN3_5_..._HOOK_FN
    the same under Qwen3.5's `encoder` / `projector` names), in numpy."""
    v, E, P = {**tower.VISION_DEFAULTS, **vision}, encoder, projector
    H, N = v["hidden_size"], v["num_heads"]
    D = H // N
    g = lambda k: hf[tower.HF + k]  # noqa: E731
    out = {
        f"{E}/patch_embed/proj/kernel": g("patch_embed.proj.weight").transpose(2, 3, 4, 1, 0),
        f"{E}/patch_embed/proj/bias": g("patch_embed.proj.bias"),
        f"{E}/pos_embed_interpolate/pos_embed": g("pos_embed.weight"),
    }
    for i in range(v["depth"]):
        b, m = f"blocks.{i}.", f"{E}/blocks_{i}/"
        qkv, qkv_b = g(b + "attn.qkv.weight"), g(b + "attn.qkv.bias")
        for k, name in enumerate(("query", "key", "value")):
            out[m + f"attn/attn/{name}/kernel"] = qkv[k * H : (k + 1) * H].T.reshape(H, N, D)
            out[m + f"attn/attn/{name}/bias"] = qkv_b[k * H : (k + 1) * H].reshape(N, D)
        out[m + "attn/attn/out/kernel"] = g(b + "attn.proj.weight").T.reshape(N, D, H)
        out[m + "attn/attn/out/bias"] = g(b + "attn.proj.bias")
        for hf_n, mt_n in (("norm1", "ln1"), ("norm2", "ln2")):
            out[m + f"{mt_n}/scale"], out[m + f"{mt_n}/bias"] = g(b + hf_n + ".weight"), g(b + hf_n + ".bias")
        for hf_n, mt_n in (("linear_fc1", "mlp"), ("linear_fc2", "mlp_out")):
            out[m + f"{mt_n}/kernel"], out[m + f"{mt_n}/bias"] = g(f"{b}mlp.{hf_n}.weight").T, g(f"{b}mlp.{hf_n}.bias")
    mergers = [(f"deepstack_merger_list.{k}.", f"{E}/merger_{k}/") for k in range(len(v["deepstack_visual_indexes"]))]
    for hf_p, mt_p in [*mergers, ("merger.", f"{P}/merger/")]:
        out[mt_p + "ln_q/scale"], out[mt_p + "ln_q/bias"] = g(hf_p + "norm.weight"), g(hf_p + "norm.bias")
        for hf_n, mt_n in (("linear_fc1", "mlp_0"), ("linear_fc2", "mlp_2")):
            out[mt_p + f"{mt_n}/kernel"], out[mt_p + f"{mt_n}/bias"] = (
                g(f"{hf_p}{hf_n}.weight").T,
                g(f"{hf_p}{hf_n}.bias"),
            )
    return out


@pytest.fixture(scope="module")
def hf():
    return tiny_tower()


def test_stored_values_are_maxtexts_layout(hf):
    ours, theirs = to_maxtext(hf), maxtext_hooks(hf)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        assert np.array_equal(bits(np.ascontiguousarray(ours[k])), bits(np.ascontiguousarray(theirs[k]))), k


def test_every_hf_tensor_is_converted(hf):
    read = {leaf.hf_name(leaf.hf_layer) for leaf in Tower.plan(TINY, scan=False)}
    assert read == set(hf)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_round_trip_is_bit_exact(hf, dtype):
    """Nothing in the tower is scaled: moves only, so both directions are exact in any dtype."""
    src = {k: v.astype(dtype) for k, v in hf.items()}
    mt = to_maxtext(src, dtype)
    back = to_hf(mt, dtype)
    assert sorted(back) == sorted(src)
    for k in src:
        assert back[k].shape == src[k].shape and back[k].dtype == src[k].dtype, k
        assert np.array_equal(bits(np.ascontiguousarray(back[k])), bits(src[k])), k
    again = to_maxtext(back, dtype)
    assert all(np.array_equal(bits(np.ascontiguousarray(again[k])), bits(np.ascontiguousarray(mt[k]))) for k in mt)


@pytest.mark.parametrize("model", sorted(MAXTEXT_TOWER))
def test_real_size_tower_is_maxtexts_tree(model):
    count, shapes = MAXTEXT_TOWER[model]
    plan = Tower.plan(PUBLISHED[model], scan=False)

    def short(p):
        return re.sub(
            r"blocks_\d+", "blocks_N", p.replace(tower.ENCODER + "/", "E/").replace(tower.PROJECTOR + "/", "P/")
        )

    assert len(plan) == count
    ours = {short(leaf.path): leaf.shape for leaf in plan}
    assert ours == shapes


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"out_hidden_size": 40}, "out_hidden_size 40 != text hidden_size 48"),
        ({"num_position_embeddings": 30}, "not a square grid"),
        ({"deepstack_visual_indexes": [0, 3]}, "out of range for depth 3"),
        ({"num_heads": 5}, "not a multiple of num_heads"),
        ({"patch_size": [4, 4]}, "patch_size must be a positive integer"),
    ],
)
def test_refused_configs_say_why(change, reason):
    with pytest.raises(MappingError, match=re.escape(reason)):
        tower.vision_dims({**TINY, **change}, text_hidden=48)


# ------------------------------------------------------------------------------ inside a multimodal checkpoint


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """`multimodal(dtype)` -> a tiny random Qwen3VLForConditionalGeneration folder (3 text layers, the family's tiny
    tower: deepstack after both of its 2 blocks)."""
    return model_cache(tmp_path_factory, "qwen3-vl", layers=3)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_multimodal_checkpoint_round_trips_with_the_tower(multimodal, tmp_path, dtype):
    """HF -> MaxText (unscanned) -> HF -> MaxText, bit-exact (round_trip asserts it), the tower stored in MaxText's
    layout, every one of its arrays present."""
    import json

    src = multimodal(dtype)
    params, _ = round_trip(src, tmp_path, scan=False, dtype=dtype)
    vision = json.loads((src / "config.json").read_text())["vision_config"]
    want = maxtext_hooks(hf_tensors(src), vision)
    assert sorted(k for k in params if k.startswith("vision_encoder/")) == sorted(want)
    for k, v in want.items():
        assert np.array_equal(bits(np.ascontiguousarray(params[k])), bits(np.ascontiguousarray(v))), k


def test_scanned_checkpoint_holds_the_same_tower(multimodal, tmp_path):
    """The tower is never scanned: a scanned checkpoint holds it as the unscanned one does (MaxText 0.2.5 itself runs
    deepstack only with scan_layers=false; the family docstring says so)."""
    from converters.convert import hf_to_maxtext
    from converters.io.orbax import read_params

    src = multimodal("float32")
    for scan in (True, False):
        hf_to_maxtext(src, tmp_path / f"mt{scan}", scan=scan, dtype="float32")
    a, b = (read_params(tmp_path / f"mt{scan}") for scan in (True, False))
    tower = sorted(k for k in a if k.startswith("vision_encoder/"))
    assert tower and tower == sorted(k for k in b if k.startswith("vision_encoder/"))
    assert all(np.array_equal(bits(a[k]), bits(b[k])) for k in tower)


def test_export_gives_transformers_the_same_image_logits(multimodal, tmp_path):
    """The exported Qwen3VLForConditionalGeneration computes the source's logits on a prompt holding an image,
    bit for bit (float32, nothing scaled)."""
    import json

    from transformers import AutoModelForImageTextToText

    from converters.convert import hf_to_maxtext, maxtext_to_hf
    from converters.verify.reference.qwen3_vl_vision import image_prompt

    src = multimodal("float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"] and cfg["model_type"] == "qwen3_vl"
    ids, inputs = image_prompt(cfg)
    args = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    out = []
    for folder in (src, tmp_path / "hf"):
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids]), **args).logits[0].numpy())
    assert np.array_equal(out[0], out[1])


@pytest.mark.slow
def test_moe_multimodal_checkpoint_round_trips_with_the_tower(tmp_path):
    from converters.tiny_models import make_test_model

    src = make_test_model("qwen3-vl-moe", tmp_path / "src", layers=3, dtype="bfloat16")
    params, _ = round_trip(src, tmp_path, scan=False, dtype="bfloat16")
    assert any(k.startswith("vision_encoder/Qwen3VLVisionEncoder_0/merger_1/") for k in params)
