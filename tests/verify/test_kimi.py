"""Kimi-K2 verification: a `kimi_k2` config is read as the `deepseek_v3` it is on both sides (transformers' DeepSeek-V3
modules, our DeepSeekForward), never through the repos' remote code.

1. The JAX reference against transformers on the tiny Kimi (Kimi's YaRN: factor 32, beta_fast = beta_slow = 1, theta
   50000; ungrouped sigmoid routing with the correction bias; routed scaling 2.827), weights laid out by numpy, float32:
   KL < 1e-9, as for DeepSeek-V3 (tests/verify/test_deepseek.py).
2. A conversion of the int4 (Kimi-K2-Thinking-style) source verifies against that source, float32, KL < 1e-9: both
   sides read the same decoded experts.
3. A conversion that unpacks the int4 words high nibble first (the order MXFP4 does not use either) fails verification.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.io import quantized
from converters.verify import verify
from tests.families.helpers import deepseek_layout, hf_tensors
from tests.families.test_kimi import int4_twins, kimi  # noqa: F401 (fixtures)
from tests.verify.helpers import assert_reference_matches_transformers

EXACT_KL = 1e-9  # float32 on both sides: only summation order differs (measured ~1e-13)


@pytest.mark.slow  # a float32 model of its own, and a 300-token forward both ways (~15 s)
def test_reference_matches_transformers(kimi):  # noqa: F811
    from transformers import DeepseekV3Config

    src = kimi("float32")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["rope_parameters"]["factor"] == 32 and cfg["rope_parameters"]["beta_fast"] == 1 and cfg["n_group"] == 1
    as_v3 = DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "auto_map"} | {"model_type": "deepseek_v3"})
    hf = {k: v.astype(np.float32) for k, v in hf_tensors(src).items()}
    for scan in (True, False):
        # the reference gets the kimi_k2 config itself and builds it as deepseek_v3 (reference/common.py)
        assert_reference_matches_transformers(src, deepseek_layout(hf, cfg, scan), EXACT_KL, hf_config=as_v3)


# two conversions and two verify runs (~18 s): the default run checks the kimi_k2 -> deepseek_v3 reading here
def test_int4_conversion_verifies_and_a_wrong_nibble_order_does_not(int4_twins, tmp_path, monkeypatch):  # noqa: F811
    int4, _ = int4_twins
    hf_to_maxtext(int4, tmp_path / "mt", scan=True)
    r = verify(maxtext=tmp_path / "mt", hf=int4)
    assert r.passed and r.data["summary"]["kl_max"] < EXACT_KL, r.data["summary"]
    real = quantized.decode_int4_groups

    def high_nibble_first(packed, scale, in_features, group):
        b = packed.view(np.uint8)
        swapped = ((b >> 4) | (b << 4)).astype(np.uint8).view(np.int32)
        return real(swapped, scale, in_features, group)

    monkeypatch.setattr(quantized, "decode_int4_groups", high_nibble_first)
    hf_to_maxtext(int4, tmp_path / "bad", scan=True)
    monkeypatch.undo()
    bad = verify(maxtext=tmp_path / "bad", hf=int4)
    assert not bad.passed and bad.data["summary"]["kl_max"] > 1e-3, bad.data["summary"]
