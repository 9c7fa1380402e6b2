"""Qwen3-Next reference forward (zero-centred norms, gated full attention with partial RoPE, gated delta net with its
causal depthwise conv in recurrent form, routed + gated shared experts) and verification of converted checkpoints.

1. The JAX reference against transformers (which runs the chunked delta rule) on weights laid out by numpy, float32:
   KL < 1e-9 (measured max ~4e-11).
2. Converted checkpoints (scanned: MaxText 0.2.5's `local_layers` [.., blocks, 3, ..] + `global_layer` blocks;
   unscanned) verify on the default prompts, incl. the long one; so does older ckptflow's scanned `layer_0..3` layout,
   with a warning that MaxText does not load it.
3. A converter that flips the conv taps (convolution vs correlation) fails verification.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.mapping import Rule
from converters.core.transforms import Transform
from converters.families.qwen3_next import Qwen3Next
from converters.tiny_models import make_test_model
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from tests.families.helpers import hf_tensors, qwen3_next_layout

FAMILY, LAYERS = "qwen3-next", 8
EXACT_KL = 1e-9


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


def test_reference_matches_transformers(hf_model):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_model("float32")
    cfg = json.loads((src / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    hf = hf_tensors(src)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert float(np.std(want)) > 0.5
    for scan, legacy in ((True, False), (True, True), (False, False)):
        params = qwen3_next_layout(hf, cfg, scan, legacy=legacy)
        assert kl_per_token(want, ReferenceModel(params, cfg).logits(ids)).max() < EXACT_KL


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(hf_model, tmp_path, scan):
    hf_to_maxtext(hf_model(), tmp_path / "mt", scan=scan)
    r = verify(maxtext=tmp_path / "mt", hf=hf_model())
    assert r.passed and r.data["summary"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    assert r.data["warnings"] == []


def test_legacy_layer_stacks_verify_with_a_warning(hf_model, tmp_path):
    """Older ckptflow's scanned layout, `decoder/layers/layer_<p>` (HF layers p, p + 4, ...), rebuilt from a current
    checkpoint (position p < 3 of each block is local_layers[:, :, p]), verifies and says MaxText does not load it."""
    from tests.verify.helpers import restore_tree, save_tree

    hf_to_maxtext(hf_model(), tmp_path / "mt", scan=True)
    tree = restore_tree(tmp_path / "mt")
    layers = tree["params"]["params"]["decoder"]["layers"]
    local, full = layers.pop("local_layers"), layers.pop("global_layer")
    for p in range(3):
        layers[f"layer_{p}"] = jax.tree.map(lambda x, p=p: np.ascontiguousarray(np.asarray(x)[:, :, p]), local)
    layers["layer_3"] = full
    r = verify(maxtext=save_tree(tree, tmp_path / "mt", tmp_path / "old"), hf=hf_model())
    assert r.passed and r.data["summary"]["kl_max"] < EXACT_KL, r.data["summary"]
    assert any("layer_<p>" in w and "re-convert" in w for w in r.data["warnings"]), r.data["warnings"]


class _FlipTaps(Transform):
    """Reverses the conv kernel's tap axis (MaxText `[k, 1, C]` axis 0)."""

    def forward(self, x):
        return x[::-1]

    def inverse(self, y):
        return np.ascontiguousarray(y[::-1])


def test_flipped_conv_taps_fail_verification(hf_model, tmp_path, monkeypatch):
    real = Qwen3Next.linear_attention_rules.__func__

    def flipped(cls, d):
        return [
            Rule(r.hf, r.mt, hf_shape=r.hf_shape, mt_shape=r.mt_shape, chain=r.chain + (_FlipTaps(),))
            if r.mt.endswith("conv1d/kernel")
            else r
            for r in real(cls, d)
        ]

    monkeypatch.setattr(Qwen3Next, "linear_attention_rules", classmethod(flipped))
    hf_to_maxtext(hf_model(), tmp_path / "mt", scan=True)
    r = verify(maxtext=tmp_path / "mt", hf=hf_model())
    assert not r.passed, r.data["summary"]
