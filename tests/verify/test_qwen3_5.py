"""(Every test here is `slow`: the default run's budget; tests/families/test_qwen3_5.py runs the scanned round trip.)

Qwen3.5 MoE reference forward (Qwen3-Next's: converters/verify/reference/qwen3_5.py) and verification of converted
checkpoints.

1. The JAX reference against transformers' Qwen3.5 (float32, its chunked delta rule) on weights laid out by numpy:
   KL < 1e-9, as for Qwen3-Next (both compute in float32; the delta rule's recurrent vs chunked order is the residue).
2. Converted checkpoints (scanned: MaxText 0.2.5's `layer_<p>` stacks; unscanned) verify on the default prompts,
   without warnings.
3. Each Qwen3.5-specific transform, deliberately broken, fails verification: the qkv + z fusion (q and k swapped per
   key head), the b + a fusion (b and a swapped), the expert slices of the published fused experts (gate and up
   swapped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.transforms import Fusion, Slices
from converters.families import qwen3_5
from converters.families.qwen3_5 import Qwen3_5Moe
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from tests.families.helpers import hf_tensors
from tests.families.test_qwen3_5 import fuse_experts, hf_model, next_layout, write_folder  # noqa: F401 (fixture)

EXACT_KL = 1e-9


@pytest.mark.slow
def test_reference_matches_transformers(hf_model):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_model("float32", tower=True)
    cfg = json.loads((src / "config.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]  # every language-model weight loaded
    hf = hf_tensors(src)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    with torch.no_grad():
        want = model.eval()(torch.tensor([ids])).logits[0].numpy()
    assert float(np.std(want)) > 0.5
    for scan in (True, False):
        # the language model's arrays only: the config marked as a checkpoint without the tower (text prompts)
        text_only = {**cfg, qwen3_5.NO_TOWER: True}
        kl = kl_per_token(want, ReferenceModel(next_layout(hf, cfg, scan), text_only).logits(ids))
        assert kl.max() < EXACT_KL, kl.max()


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(hf_model, tmp_path, scan):
    hf_to_maxtext(hf_model(), tmp_path / "mt", scan=scan)
    r = verify(maxtext=tmp_path / "mt", hf=hf_model())
    assert r.passed and r.data["summary"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert r.data["warnings"] == []


def _swap_qk(f: Fusion) -> Fusion:
    """The qkv + z fusion with q and k swapped within every key head (same shapes)."""

    def join(xs):
        d = Qwen3_5Moe.dims(_cfg)
        hk, dk, e = d.extra["key_heads"], d.extra["key_dim"], d.emb
        qkv = xs[0].copy()
        q, k = qkv[: hk * dk].copy(), qkv[hk * dk : 2 * hk * dk].copy()
        qkv[: hk * dk], qkv[hk * dk : 2 * hk * dk] = k, q
        return f.join([qkv, xs[1]]).reshape(-1, e)

    return Fusion(f.name, f.parts, join, f.take)


def _swap_ba(f: Fusion) -> Fusion:
    return Fusion(f.name, f.parts, lambda xs: f.join(xs[::-1]), f.take)


def _swap_gate_up(s: Slices) -> Slices:
    if not s.disk.endswith("gate_up_proj"):
        return s
    views = [
        (n.replace("gate_proj", "@").replace("up_proj", "gate_proj").replace("@", "up_proj"), i) for n, i in s.views
    ]
    return Slices(s.disk, tuple(views))


_cfg: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["qkvz", "ba", "experts"])
def test_broken_transforms_fail_verification(hf_model, tmp_path, monkeypatch, broken):
    src = hf_model()
    _cfg.update(json.loads((src / "config.json").read_text()))
    if broken == "experts":  # the published fused layout, read with gate and up swapped
        src = write_folder(src, tmp_path / "pub", fuse_experts(hf_tensors(src), 8))
    real = Qwen3_5Moe.hf_fusions.__func__

    def wrong(cls, d):
        out = []
        for f in real(cls, d):
            if broken == "qkvz" and isinstance(f, Fusion) and f.name.endswith("in_proj_qkvz.weight"):
                f = _swap_qk(f)
            elif broken == "ba" and isinstance(f, Fusion) and f.name.endswith("in_proj_ba.weight"):
                f = _swap_ba(f)
            elif broken == "experts" and isinstance(f, Slices):
                f = _swap_gate_up(f)
            out.append(f)
        return out

    with monkeypatch.context() as m:
        m.setattr(Qwen3_5Moe, "hf_fusions", classmethod(wrong))
        hf_to_maxtext(src, tmp_path / "mt", scan=True)
    r = verify(maxtext=tmp_path / "mt", hf=src)
    assert not r.passed, r.data["summary"]
    assert qwen3_5.TEXT == "model.language_model."
