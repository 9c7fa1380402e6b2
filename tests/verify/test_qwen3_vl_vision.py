"""Qwen3-VL's vision tower reference (converters/verify/reference/qwen3_vl_vision.py) against transformers'
`Qwen3VLVisionModel`, float32, on the tiny random tower of tests/families/test_qwen3_vl_vision.py.

1. On weights laid out by the tower's rules, the reference reproduces transformers' image tokens (the projector's
   output) and every deepstack feature to float32 accumulation noise: measured max |diff| 5e-6 on values up to
   6.6 (7e-7 relative); the bound is 1e-5 relative (a conv vs a dot product, and attention sums in another order).
   Two images, non-square grids of different sizes (the position table is interpolated to each).
2. `maxtext_numerics=True` (MaxText's tanh-GELU in the mergers and its bfloat16-rounded position table) differs
   from transformers by more than the bound (measured 2e-4 relative): the option really changes the computation.
3. One wrong mapping per transform is caught: the checkpoint written with it, read back by the same (wrong)
   inverse, gives transformers the original weights, so only the reference on the checkpoint can see it -- it must
   differ from transformers by more than 100x the bound.
4. End to end, on a tiny Qwen3-VL (3 text layers, the family's tiny tower, deepstack after both tower blocks)
   converted unscanned in float32: `verify` runs its image prompt through the tower, the image tokens, the 3D
   (multimodal RoPE) positions and the deepstack additions, against transformers (measured max KL 1.5e-13 on the
   image prompt, 2e-13 on the text ones). The image prompt fails when the reference leaves out any of the three, and
   a wrong tower mapping fails only the image prompt. Measured image-prompt layout KL (threshold 1e-5): without
   deepstack 0.21, at text positions 0.035, without the image tokens 0.29; qkv bias interleaved 9.5e-3, patch rows
   and columns swapped 4.1e-2 (content passes: the inverse undoes each).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from converters.core.transforms import Deinterleave, Permute, Reshape
from converters.families import qwen3_vl_vision as tower
from converters.verify import verify
from converters.verify.reference import qwen3_vl_vision as ref
from tests.families.test_qwen3_vl_vision import TINY, to_maxtext

BOUND = 1e-5  # relative to the largest output value: float32 summation-order noise, see the docstring
# images (t = 1): for a video (t > 1) HF attends within each frame (one cu_seqlens span per frame) and MaxText over
# all frames of the video at once, so the two differ whatever the checkpoint; verify uses images only
GRIDS = [[1, 6, 8], [1, 4, 2]]


@pytest.fixture(scope="module")
def hf_tower():
    """A tiny random Qwen3VLVisionModel (weights ~N(0, 0.2), so every block matters) and its outputs on the GRIDS
    images: (HF tensors, pixels, image tokens, deepstack features)."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(0)
    cfg = Qwen3VLVisionConfig(**TINY)
    cfg._attn_implementation = "eager"
    m = Qwen3VLVisionModel(cfg).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(n, TINY["in_channels"] * TINY["temporal_patch_size"] * TINY["patch_size"] ** 2)
    with torch.no_grad():
        out = m(pixels, grid_thw=torch.tensor(GRIDS))
    hf = {tower.HF + k: v.numpy().copy() for k, v in m.state_dict().items()}
    return cfg, hf, pixels.numpy(), out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


def relative_error(cfg, mt: dict, pixels, tokens, deep, **kw) -> float:
    got, got_deep = ref.vision_features(ref.vision_spec(cfg, **kw), mt, pixels, np.asarray(GRIDS))
    assert got.shape == tokens.shape and len(got_deep) == len(deep)
    errors = [np.abs(got - tokens).max() / np.abs(tokens).max()]
    errors += [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(got_deep, deep)]
    return float(max(errors))


def test_reference_matches_transformers(hf_tower):
    cfg, hf, pixels, tokens, deep = hf_tower
    assert relative_error(cfg, to_maxtext(hf), pixels, tokens, deep) < BOUND


@pytest.mark.slow
def test_maxtext_numerics_differ_from_transformers(hf_tower):
    cfg, hf, pixels, tokens, deep = hf_tower
    assert relative_error(cfg, to_maxtext(hf), pixels, tokens, deep, maxtext_numerics=True) > 10 * BOUND


def _broken(rule_name: str, **change):
    """The tower's rules with the rule for `rule_name` (an HF name, `{i}` for blocks) replaced by `change`."""
    rules, blocks = tower.vision_rules, tower.block_rules

    def fix(rs):
        return [dataclasses.replace(r, **change) if r.hf.endswith(rule_name) else r for r in rs]

    return (lambda v: fix(rules(v))), (lambda v: fix(blocks(v)))


H, N = TINY["hidden_size"], TINY["num_heads"]
D = H // N
WRONG = {
    # the Conv3d weight with the patch's rows and columns swapped
    "patch rows/cols swapped": ("patch_embed.proj.weight", {"chain": (Permute((2, 4, 3, 1, 0)),)}),
    # the fused q|k|v Linear reshaped without its transpose
    "qkv kernel not transposed": ("attn.qkv.weight", {"chain": (Reshape((H, N, D), (H, H)),)}),
    # q, k, v taken as interleaved rows instead of three blocks
    "qkv bias interleaved": ("attn.qkv.bias", {"split": Deinterleave(3, axis=0)}),
    # the attention output projection reshaped without its transpose
    "out kernel not transposed": ("attn.proj.weight", {"chain": (Reshape((N, D, H), (H, H)),)}),
    # the position table transposed (rows of the grid read as columns)
    "position grid transposed": (
        "pos_embed.weight",
        {"chain": (Reshape((6, 6, H), (36, H)), Permute((1, 0, 2)), Reshape((36, H), (6, 6, H)))},
    ),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_a_wrong_mapping_is_caught(hf_tower, monkeypatch, mistake):
    cfg, hf, pixels, tokens, deep = hf_tower
    name, change = WRONG[mistake]
    rules, blocks = _broken(name, **change)
    monkeypatch.setattr(tower, "vision_rules", rules)
    monkeypatch.setattr(tower, "block_rules", blocks)
    mt = to_maxtext(hf)
    assert relative_error(cfg, mt, pixels, tokens, deep) > 100 * BOUND, mistake


def test_swapped_deepstack_mergers_are_caught(hf_tower):
    """merger_<k> belongs to deepstack_visual_indexes[k]: stored in the other order, the deepstack features move."""
    cfg, hf, pixels, tokens, deep = hf_tower
    mt = to_maxtext(hf)
    a, b = f"{tower.ENCODER}/merger_0/", f"{tower.ENCODER}/merger_1/"
    swapped = {
        (k.replace(a, b) if k.startswith(a) else k.replace(b, a) if k.startswith(b) else k): v for k, v in mt.items()
    }
    assert relative_error(cfg, swapped, pixels, tokens, deep) > 100 * BOUND


# ---------------------------------------------------------------------------------------------------- 4.

EXACT_KL = 1e-9  # float32 reference vs transformers on the same values: accumulation noise only


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from converters.convert import hf_to_maxtext
    from converters.tiny_models import make_test_model

    root = tmp_path_factory.mktemp("qwen3-vl")
    hf = make_test_model("qwen3-vl", root / "hf", layers=3, dtype="float32")
    hf_to_maxtext(hf, root / "mt", scan=False, dtype="float32")
    return hf, root / "mt"


def _prompts(r, comparison: str = "precision") -> dict:
    return {p["name"]: p["comparisons"][comparison] for p in r.data["prompts"]}


def _only_the_image_fails_layout(r):
    """The layout check fails on the image prompt by more than 100x its threshold, and passes every text prompt."""
    layout = _prompts(r, "layout")
    threshold = r.data["verdict"]["layout"]["max_kl"]
    assert not r.passed and not r.data["verdict"]["layout"]["passed"]
    assert layout["image"]["kl_max"] > 100 * threshold, layout["image"]["kl_max"]
    assert all(p["passed"] for name, p in layout.items() if name != "image")


@pytest.mark.slow  # the default run verifies an image prompt in tests/verify/test_qwen3_vl.py (MoE, scanned)
def test_verify_runs_the_image_prompt(converted):
    hf, mt = converted
    r = verify(maxtext=mt, hf=hf, dtype="float32")
    assert r.passed, r.data["summary"]
    image = _prompts(r, "layout")["image"]
    assert image["passed"] and image["kl_max"] < EXACT_KL, image
    assert any("tanh-approximated GELU" in w for w in r.data["warnings"])  # where MaxText's tower differs from HF


def _no_deepstack(monkeypatch):
    # zero features rather than a patched block: the jitted block may already be compiled in this process
    embed = ref.Qwen3VLVisionMixin.multimodal_embed

    def without_deepstack(self, *a):
        x, extra = embed(self, *a)
        return x, {**extra, "deepstack": extra["deepstack"] * 0}

    monkeypatch.setattr(ref.Qwen3VLVisionMixin, "multimodal_embed", without_deepstack)


def text_positions(monkeypatch):
    """Image tokens rotated at their text positions, not the 3-D ones (Qwen3.5's image test uses it too)."""
    monkeypatch.setattr(ref, "mrope_positions", lambda ids, *a: np.broadcast_to(np.arange(len(ids)), (3, len(ids))))


def no_image_tokens(monkeypatch):
    """The image features zeroed (the prompt's image tokens carry nothing)."""
    features = ref.vision_features

    def zero_tokens(*a):
        tokens, deep = features(*a)
        return np.zeros_like(tokens), deep

    monkeypatch.setattr(ref, "vision_features", zero_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("leave_out", [_no_deepstack, text_positions, no_image_tokens], ids=lambda f: f.__name__)
def test_the_image_prompt_needs_every_part(converted, monkeypatch, leave_out):
    """A reference without the deepstack additions, at text positions, or without the image tokens fails the image
    prompt only: each of the three really is exercised."""
    hf, mt = converted
    leave_out(monkeypatch)
    _only_the_image_fails_layout(verify(maxtext=mt, hf=hf, dtype="float32"))


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["qkv bias interleaved", "patch rows/cols swapped"])
def test_a_wrong_tower_mapping_fails_verify(converted, tmp_path, monkeypatch, mistake):
    """Written and read back with the same wrong rule: content passes (the inverse undoes it), the layout check
    fails on the image prompt, the text prompts pass."""
    assert_wrong_tower_rule_fails_image_only(converted[0], tmp_path, monkeypatch, mistake)


def assert_wrong_tower_rule_fails_image_only(hf, tmp_path, monkeypatch, mistake: str):
    """Convert `hf` with the tower rule `WRONG[mistake]` (written and read back alike) and verify: content passes,
    only the image prompt fails layout. Returns the report (Qwen3.5's tower test uses it too)."""
    from converters.convert import hf_to_maxtext

    rules, blocks = _broken(*WRONG[mistake][:1], **WRONG[mistake][1])
    monkeypatch.setattr(tower, "vision_rules", rules)
    monkeypatch.setattr(tower, "block_rules", blocks)
    hf_to_maxtext(hf, tmp_path / "mt", scan=False, dtype="float32")
    r = verify(maxtext=tmp_path / "mt", hf=hf, dtype="float32")
    assert r.data["verdict"]["content"]["passed"], r.data["verdict"]
    _only_the_image_fails_layout(r)
    return r
