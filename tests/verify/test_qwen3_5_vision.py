"""verify's image prompt on Qwen3.5 MoE (converters/verify/reference/qwen3_5.py: Qwen3-Next's layers with Qwen3-VL's
tower mixin under MaxText's `Qwen3_5MoeVision*` paths, no deepstack), on the tiny `qwen3.5-moe` (4 text layers, the
one-block tower) converted in float32 against transformers' Qwen3_5MoeForConditionalGeneration.

Measured: the image prompt (24 image tokens of an 8 x 12-patch image, 3D positions in the full-attention layer) max KL
4.9e-12 against transformers, the text prompts 8.9e-12, scanned and unscanned. The image prompt fails (and only it)
when the reference puts the image tokens at text positions (KL 6.5e-3) or leaves the image tokens out (0.47),
and when the tower was written with a wrong rule that its inverse undoes (content passes): qkv bias interleaved
(0.082), patch rows and columns swapped (0.28). Threshold 1e-5.
"""

from __future__ import annotations

import pytest

from converters.verify import verify
from tests.verify.test_qwen3_vl_vision import (
    EXACT_KL,
    _only_the_image_fails_layout,
    _prompts,
    assert_wrong_tower_rule_fails_image_only,
    no_image_tokens,
    text_positions,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from converters.convert import hf_to_maxtext
    from converters.tiny_models import make_test_model

    root = tmp_path_factory.mktemp("qwen3.5-vision")
    hf = make_test_model("qwen3.5-moe", root / "hf", layers=4, dtype="float32")
    for scan in (False, True):
        hf_to_maxtext(hf, root / f"mt{int(scan)}", scan=scan, dtype="float32")
    return hf, root


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unscanned", "scanned"])
def test_verify_runs_the_image_prompt(converted, scan):
    hf, root = converted
    r = verify(maxtext=root / f"mt{int(scan)}", hf=hf, dtype="float32")
    assert r.passed, r.data["summary"]
    layout = _prompts(r, "layout")
    print("image prompt layout KL", layout["image"]["kl_max"])
    assert layout["image"]["passed"] and layout["image"]["kl_max"] < EXACT_KL, layout["image"]
    assert all(p["kl_max"] < EXACT_KL for p in layout.values())
    assert any("tanh-approximated GELU" in w for w in r.data["warnings"])  # where MaxText's tower differs from HF


@pytest.mark.slow
@pytest.mark.parametrize("leave_out", [text_positions, no_image_tokens], ids=lambda f: f.__name__)
def test_the_image_prompt_needs_every_part(converted, monkeypatch, leave_out):
    hf, root = converted
    leave_out(monkeypatch)
    r = verify(maxtext=root / "mt0", hf=hf, dtype="float32")
    print(leave_out.__name__, "image prompt layout KL", _prompts(r, "layout")["image"]["kl_max"])
    _only_the_image_fails_layout(r)


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["qkv bias interleaved", "patch rows/cols swapped"])
def test_a_wrong_tower_mapping_fails_verify(converted, tmp_path, monkeypatch, mistake):
    """Written and read back with the same wrong rule: content passes, the layout check fails on the image prompt."""
    r = assert_wrong_tower_rule_fails_image_only(converted[0], tmp_path, monkeypatch, mistake)
    print(mistake, "image prompt layout KL", _prompts(r, "layout")["image"]["kl_max"])
